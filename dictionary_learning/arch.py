"""One description per supported model family: where its modules are and what its blocks compute
(docs/method.md §1, §2).

Every other module gets its facts about the model from here: loading and folding
(dictionary_learning/model.py), the trace and sigma (batch.py), the upstream sets (through
`SuiteArch.parallel`), the centring P of the pruned pass (`SuiteArch.centred`), evaluation's
unembedding and splicing (evaluate.py), the frozen attention of circuits.py and the logit effects
of feature_pages.py. `architecture(model)` picks the description from the transformers config's
`model_type` and checks that every module it names is there.

| family | MLP-input norm | P | MLP input projections | blocks | x0 |
|---|---|---|---|---|---|
| gpt2 | LayerNorm | centring | c_fc (Conv1D) | sequential | token + position emb. |
| gpt_neox | LayerNorm | centring | dense_h_to_4h | parallel (use_parallel_residual) | token emb. |
| llama, mistral, qwen2 | RMSNorm (w) | I | gate_proj, up_proj | sequential | token emb. |
| gemma2 | RMSNorm (1 + w) | I | gate_proj, up_proj | sequential, post-norms | token emb. x √d |
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from enum import Enum
from typing import Literal

import torch
from torch import Tensor, nn


class Norm(str, Enum):
    """How a family's norms compute (docs/method.md §2)."""

    LAYERNORM = "layernorm"
    """gamma * P x / sqrt(biased var(x) + eps) + beta."""
    RMSNORM = "rmsnorm"
    """w * x / sqrt(mean(x^2) + eps): no centring, no bias."""
    RMSNORM_1P = "rmsnorm_1p"
    """(1 + w) * x / sqrt(mean(x^2) + eps) (Gemma-2): the weight is stored as an offset from 1."""

    @property
    def centred(self) -> bool:
        """Whether the norm centres its input (P = I - 11^T / D), else P = I."""
        return self is Norm.LAYERNORM


def centre(x: Tensor, centred: bool) -> Tensor:
    """P x over the last dimension: x minus its mean when `centred` (LayerNorm), x itself (RMSNorm).

    P is symmetric, so the same function gives the rows P w_i of an encoder."""
    return x - x.mean(dim=-1, keepdim=True) if centred else x


class _Centre(torch.autograd.Function):
    """P x with a backward of one allocation: P g (P is symmetric). autograd's own backward of
    x - mean(x) holds two [F, D] tensors at once (peak memory of the pruned training step)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x - x.mean(dim=-1, keepdim=True)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g - g.mean(dim=-1, keepdim=True)


def centre_rows(W: Tensor, centred: bool) -> Tensor:
    """`centre` for a weight matrix's rows (the encoder rows P w_i), lighter in the backward."""
    return _Centre.apply(W) if centred else W


def norm_scale(x: Tensor, centred: bool, eps: float) -> Tensor:
    """sigma(x) per row: sqrt(biased var + eps) (LayerNorm) or sqrt(mean square + eps) (RMSNorm),
    in x's dtype. The number the norm divides P x by."""
    if centred:
        return (x.var(dim=-1, unbiased=False) + eps).sqrt()
    return (x.pow(2).mean(dim=-1) + eps).sqrt()


@dataclass(frozen=True)
class SuiteArch:
    """What a suite's mathematics depends on in its model's architecture; saved in the suite's
    metadata ("architecture") so that a loaded suite knows it."""

    family: str = "gpt2"
    """The model family the suite was trained on (one of `ARCHITECTURES`)."""
    parallel: bool = False
    """Parallel blocks: the MLP reads the block's input, so mlp_L's upstream set has no attn_L."""
    centred: bool = True
    """The MLP-input norm centres (LayerNorm, P = I - 11^T/D); False for RMSNorm (P = I)."""

    def to_meta(self) -> dict:
        return {"family": self.family, "parallel": self.parallel, "centred": self.centred}

    @classmethod
    def from_meta(cls, meta: dict | None) -> "SuiteArch":
        """The suite's architecture from its metadata; a suite saved without one (every suite made
        before other families were supported, and the original fork's) is GPT-2's."""
        arch = (meta or {}).get("architecture")
        if arch is None:
            return cls()
        if not isinstance(arch, dict) or not {"family", "parallel", "centred"} <= set(arch):
            raise ValueError(
                f"the suite's metadata 'architecture' is {arch!r}; expected {{'family': str, "
                "'parallel': bool, 'centred': bool}} (rewrite it, or delete it for a GPT-2 suite)"
            )
        return cls(str(arch["family"]), bool(arch["parallel"]), bool(arch["centred"]))

    def describe(self) -> str:
        return (f"{self.family} ({'parallel' if self.parallel else 'sequential'} blocks, "
                f"{'LayerNorm' if self.centred else 'RMSNorm'})")


def apply_softcap(logits: Tensor, cap: float | None) -> Tensor:
    """cap * tanh(logits / cap), or the logits unchanged when cap is None."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def hf_model(model) -> nn.Module:
    """The underlying transformers model of an nnsight model (or the model itself if plain)."""
    inner = model.__dict__.get("_module") if hasattr(model, "__dict__") else None
    return inner if isinstance(inner, nn.Module) else model


@dataclass(frozen=True)
class Architecture:
    """Module paths and block arithmetic of one model family (the transformers causal LM).

    Paths of whole-model modules start at the causal LM; paths of block modules start at the
    block; the MLP's input projections start at the MLP.
    """

    family: str
    """Name of the family (the key of `ARCHITECTURES`)."""
    model_types: tuple[str, ...]
    """transformers `config.model_type` values this description applies to."""
    example: str
    """A model class of the family, for error messages."""
    layers: str
    """The list of blocks."""
    embed: str
    """The token embedding."""
    norm: Norm
    """The family's norm."""
    attn_norm: str
    """The norm before attention (its output is the attention's input)."""
    attn: str
    """The attention module; its output (or its first element) is attention's output."""
    qkv: Literal["gpt2", "neox", "separate"]
    """Where the value projection is: GPT-2's fused Conv1D c_attn [D, 3D] (q | k | v),
    GPT-NeoX's fused query_key_value [3D, D] (per head q, k, v), or separate q/k/v_proj."""
    attn_proj: str
    """The attention's output projection, inside the attention module."""
    mlp_norm: str
    """The norm before the MLP (ln_2): its input gives sigma, its output is the MLP's input."""
    mlp: str
    """The MLP; its input is the transcoder's input."""
    mlp_in: tuple[str, ...]
    """The MLP's input projections, inside the MLP (one, or gate and up for gated MLPs): the
    MLP-input norm's weight (and bias) is folded into each."""
    final_norm: str
    """The norm before the unembedding."""
    unembed: str
    """The unembedding (LM head)."""
    n_ctx_attr: str
    """The config attribute holding the context length."""
    conv1d: bool = False
    """Projections are GPT-2 Conv1D (x @ W + b, W [in, out]) rather than nn.Linear."""
    pos_embed: str | None = None
    """The learned position embedding added to x0 (GPT-2), or None (rotary families)."""
    embed_scale: bool = False
    """x0 = token embedding x sqrt(d_model) (Gemma-2; in the embedding's dtype)."""
    attn_post_norm: str | None = None
    """A norm on the attention's output before it is added (Gemma-2): attn_out is its output."""
    mlp_post_norm: str | None = None
    """A norm on the MLP's output before it is added (Gemma-2): mlp_out is its output."""
    parallel_attr: str | None = None
    """The config attribute that makes blocks parallel (GPT-NeoX's use_parallel_residual)."""
    parallel: bool = False
    """Set from `parallel_attr` by `architecture`: attention and MLP both read the block input."""
    softcap_attr: str | None = None
    """The config attribute of the final logit soft-capping (Gemma-2), applied after unembed."""

    # ----------------------------------------------------------------------------- modules

    def blocks(self, hf: nn.Module) -> nn.ModuleList:
        return _get(hf, self.layers)

    def block(self, hf: nn.Module, layer: int) -> nn.Module:
        return self.blocks(hf)[layer]

    @property
    def attn_out(self) -> str:
        """Path, in a block, of the module whose output is attn_out_l (the vector added to the
        residual stream): the attention, or its post-norm (Gemma-2)."""
        return self.attn_post_norm or self.attn

    @property
    def mlp_out(self) -> str:
        """Path, in a block, of the module whose output is mlp_out_l: the MLP, or its
        post-norm (Gemma-2)."""
        return self.mlp_post_norm or self.mlp

    def attn_out_module(self, block: nn.Module) -> nn.Module:
        return _get(block, self.attn_out)

    def mlp_out_module(self, block: nn.Module) -> nn.Module:
        return _get(block, self.mlp_out)

    @property
    def suite_arch(self) -> SuiteArch:
        return SuiteArch(self.family, self.parallel, self.norm.centred)

    @property
    def base_model(self) -> str:
        """The base model's attribute of the causal LM (`transformer`, `model`, `gpt_neox`)."""
        return self.layers.split(".", 1)[0]

    @property
    def block_layers(self) -> str:
        """The blocks' path inside the base model (sparsify's hookpoints: `h`, `layers`)."""
        return self.layers.split(".", 1)[1]

    def hookpoint(self, kind: str, layer: int) -> str:
        """Path, inside the base model, of the module whose output dictionary `<kind>_<layer>`
        reconstructs (sparsify's hookpoint names)."""
        inner = self.attn_out if kind == "attn" else self.mlp_out
        return f"{self.block_layers}.{layer}.{inner}"

    # ----------------------------------------------------------------------------- norms

    def norm_gain(self, norm: nn.Module) -> Tensor:
        """The vector the norm multiplies by: gamma or w, or 1 + w (Gemma-2)."""
        w = norm.weight
        return 1.0 + w if self.norm is Norm.RMSNORM_1P else w

    @staticmethod
    def norm_bias(norm: nn.Module) -> Tensor | None:
        """The norm's added vector beta (LayerNorm), else None."""
        return getattr(norm, "bias", None)

    @staticmethod
    def norm_eps(norm: nn.Module) -> float:
        for attr in ("eps", "variance_epsilon"):
            if hasattr(norm, attr):
                return float(getattr(norm, attr))
        raise TypeError(f"norm {type(norm).__name__} has no eps / variance_epsilon")

    def sigma(self, x: Tensor, eps: float) -> Tensor:
        """sigma of the family's norm at each row of x (docs/method.md (2.1))."""
        return norm_scale(x, self.norm.centred, eps)

    @torch.no_grad()
    def fold(self, hf: nn.Module) -> None:
        """Fold every block's MLP-input norm into the MLP's input projections, in place.

        With h = W x + b a projection and the norm gain * P r / sigma + beta:
        W <- W diag(gain), b <- b + W beta; then the norm's gain is 1 and beta 0 (docs/method.md
        (2.2)), so the MLP's input is P r / sigma. Both gate and up of a gated MLP are folded.
        Outputs are unchanged up to rounding (the arithmetic is in fp32); folding twice changes
        nothing.
        """
        for layer, block in enumerate(self.blocks(hf)):
            norm, mlp = _get(block, self.mlp_norm), _get(block, self.mlp)
            gain_D = self.norm_gain(norm).float()
            beta = self.norm_bias(norm)
            beta_D = None if beta is None else beta.float()
            for name in self.mlp_in:
                proj = _get(mlp, name)
                # W_HD: [out, in] for nn.Linear; Conv1D stores [in, out]
                W_HD = proj.weight.float().T if self.conv1d else proj.weight.float()
                if W_HD.shape[1] != gain_D.shape[0]:
                    raise TypeError(
                        f"layer {layer}: {self.mlp}.{name} has weight {tuple(proj.weight.shape)}, "
                        f"which does not read d_model={gain_D.shape[0]}; is this a "
                        f"{self.example}?"
                    )
                # the bias first: W_HD may share storage with the weight overwritten below
                if beta_D is not None and bool(beta_D.any()):
                    if proj.bias is None:
                        raise TypeError(
                            f"layer {layer}: {self.mlp_norm} has a bias but {self.mlp}.{name} "
                            "has none to fold it into"
                        )
                    # beta W as a row vector times W [D, H]: bit-identical to the GPT-2-only
                    # folding of earlier versions, so the embedded model's digests stay the same
                    proj.bias.copy_((proj.bias.float() + beta_D @ W_HD.T).to(proj.bias.dtype))
                new_W = W_HD * gain_D[None, :]
                proj.weight.copy_((new_W.T if self.conv1d else new_W).to(proj.weight.dtype))
            norm.weight.fill_(0.0 if self.norm is Norm.RMSNORM_1P else 1.0)
            if beta is not None:
                beta.zero_()

    # ----------------------------------------------------------------------------- ends

    @torch.no_grad()
    def x0(self, hf: nn.Module, toks_ST: Tensor) -> Tensor:
        """x0 = the input of block 0 [S, T, D]: token embedding, + position embedding (GPT-2),
        x sqrt(d_model) in the embedding's dtype (Gemma-2)."""
        E = _get(hf, self.embed).weight
        x_STD = E[toks_ST]
        if self.pos_embed is not None:
            x_STD = x_STD + _get(hf, self.pos_embed).weight[: toks_ST.shape[-1]]
        if self.embed_scale:
            x_STD = x_STD * torch.tensor(E.shape[1] ** 0.5).to(E.dtype)
        return x_STD

    def softcap_value(self, hf: nn.Module) -> float | None:
        """The final logit soft-cap of this model, None where the family has none."""
        return getattr(hf.config, self.softcap_attr, None) if self.softcap_attr else None

    def softcap(self, hf: nn.Module, logits: Tensor) -> Tensor:
        """The final logit soft-capping cap * tanh(logits / cap) where the family has one."""
        return apply_softcap(logits, self.softcap_value(hf))

    # ----------------------------------------------------------------------------- attention

    def heads(self, hf: nn.Module) -> tuple[int, int, int]:
        """(query heads H, key/value heads, head width)."""
        cfg = hf.config
        H = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or H)
        dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
        return H, n_kv, int(dh)

    def value_output(self, hf: nn.Module, layer: int, dtype: torch.dtype
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per query head h: W_V [H, D, dh] and b_V [H, dh] (x @ W_V[h] + b_V[h] is head h's value,
        key/value heads shared as GQA does), W_O [H, dh, D] and b_O [D] (the output projection:
        sum_h z_h @ W_O[h] + b_O)."""
        H, n_kv, dh = self.heads(hf)
        attn = _get(self.block(hf, layer), self.attn)
        D = hf.config.hidden_size

        def bias(mod: nn.Module, n: int) -> Tensor:
            b = getattr(mod, "bias", None)
            return torch.zeros(n, dtype=dtype, device=mod.weight.device) if b is None \
                else b.to(dtype)

        if self.qkv == "gpt2":
            W, b = attn.c_attn.weight.to(dtype), bias(attn.c_attn, 3 * H * dh)
            W_V_YDd = W[:, 2 * H * dh:].view(D, H, dh).permute(1, 0, 2)
            b_V_Yd = b[2 * H * dh:].view(H, dh)
        elif self.qkv == "neox":
            qkv = attn.query_key_value
            W_V_YDd = qkv.weight.to(dtype).view(H, 3, dh, D)[:, 2].transpose(1, 2)
            b_V_Yd = bias(qkv, 3 * H * dh).view(H, 3, dh)[:, 2]
        else:
            v = attn.v_proj
            rep = H // n_kv
            W_V_YDd = v.weight.to(dtype).view(n_kv, dh, D).transpose(1, 2)
            W_V_YDd = W_V_YDd.repeat_interleave(rep, dim=0)
            b_V_Yd = bias(v, n_kv * dh).view(n_kv, dh).repeat_interleave(rep, dim=0)
        o = _get(attn, self.attn_proj)
        W_o = o.weight.to(dtype)
        W_O_YdD = (W_o if self.conv1d else W_o.T).reshape(H, dh, D)
        return W_V_YDd.contiguous(), b_V_Yd.contiguous(), W_O_YdD.contiguous(), bias(o, D)

    @torch.no_grad()
    def attention_patterns(self, hf: nn.Module, toks_ST: Tensor) -> list[Tensor]:
        """The attention probabilities [S, H, T, T] of every layer, read from the model itself
        (eager attention, which returns them), so every family's masking, soft-capping and
        sliding windows are the model's own."""
        got: dict[int, Tensor] = {}
        handles = [
            _get(block, self.attn).register_forward_hook(
                lambda m, a, out, layer=layer: got.__setitem__(layer, out[1]))
            for layer, block in enumerate(self.blocks(hf))
        ]
        try:
            with _attn_implementation(hf, "eager"):
                hf(input_ids=toks_ST, attention_mask=torch.ones_like(toks_ST), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        missing = [layer for layer in range(len(self.blocks(hf)))
                   if not isinstance(got.get(layer), Tensor)]
        if missing:
            raise RuntimeError(
                f"layers {missing}: the {self.attn} module returned no attention probabilities in "
                "eager mode; this transformers version is not supported for circuits"
            )
        return [got[layer] for layer in range(len(got))]


@contextlib.contextmanager
def _attn_implementation(hf: nn.Module, impl: str):
    previous = hf.config._attn_implementation
    if previous == impl:
        yield
        return
    hf.set_attn_implementation(impl)
    try:
        yield
    finally:
        hf.set_attn_implementation(previous)


_LLAMA = Architecture(
    family="llama", model_types=("llama",), example="LlamaForCausalLM",
    layers="model.layers", embed="model.embed_tokens", norm=Norm.RMSNORM,
    attn_norm="input_layernorm", attn="self_attn", qkv="separate", attn_proj="o_proj",
    mlp_norm="post_attention_layernorm", mlp="mlp", mlp_in=("gate_proj", "up_proj"),
    final_norm="model.norm", unembed="lm_head", n_ctx_attr="max_position_embeddings",
)

ARCHITECTURES: dict[str, Architecture] = {a.family: a for a in (
    Architecture(
        family="gpt2", model_types=("gpt2",), example="GPT2LMHeadModel",
        layers="transformer.h", embed="transformer.wte", pos_embed="transformer.wpe",
        norm=Norm.LAYERNORM, attn_norm="ln_1", attn="attn", qkv="gpt2", attn_proj="c_proj",
        mlp_norm="ln_2", mlp="mlp", mlp_in=("c_fc",), conv1d=True,
        final_norm="transformer.ln_f", unembed="lm_head", n_ctx_attr="n_positions",
    ),
    Architecture(
        family="gpt_neox", model_types=("gpt_neox",), example="GPTNeoXForCausalLM (Pythia)",
        layers="gpt_neox.layers", embed="gpt_neox.embed_in", norm=Norm.LAYERNORM,
        attn_norm="input_layernorm", attn="attention", qkv="neox", attn_proj="dense",
        mlp_norm="post_attention_layernorm", mlp="mlp", mlp_in=("dense_h_to_4h",),
        final_norm="gpt_neox.final_layer_norm", unembed="lm_head",
        n_ctx_attr="max_position_embeddings", parallel_attr="use_parallel_residual",
    ),
    _LLAMA,
    replace(_LLAMA, family="mistral", model_types=("mistral",), example="MistralForCausalLM"),
    replace(_LLAMA, family="qwen2", model_types=("qwen2",), example="Qwen2ForCausalLM"),
    replace(
        _LLAMA, family="gemma2", model_types=("gemma2",), example="Gemma2ForCausalLM",
        norm=Norm.RMSNORM_1P, embed_scale=True, attn_post_norm="post_attention_layernorm",
        mlp_norm="pre_feedforward_layernorm", mlp_post_norm="post_feedforward_layernorm",
        softcap_attr="final_logit_softcapping",
    ),
)}
"""The supported families, by name."""


def supported() -> str:
    return ", ".join(f"{a.family} ({a.example})" for a in ARCHITECTURES.values())


def architecture(model) -> Architecture:
    """The description of `model` (a transformers causal LM, plain or nnsight-wrapped), with its
    parallel flag read from the config; TypeError naming what did not match otherwise."""
    hf = hf_model(model)
    cfg = getattr(hf, "config", None)
    model_type = getattr(cfg, "model_type", None)
    arch = next((a for a in ARCHITECTURES.values() if model_type in a.model_types), None)
    if arch is None:
        raise TypeError(
            f"model {type(hf).__name__} (config.model_type {model_type!r}) is not a supported "
            f"family; supported: {supported()}. Load one of these as a causal LM "
            "(AutoModelForCausalLM)."
        )
    if arch.parallel_attr is not None:
        arch = replace(arch, parallel=bool(getattr(cfg, arch.parallel_attr)))
    top = [arch.layers, arch.embed, arch.final_norm, arch.unembed]
    top += [arch.pos_embed] if arch.pos_embed else []
    for path in top:
        _check_path(hf, path, type(hf).__name__, arch)
    blocks = arch.blocks(hf)
    if len(blocks) == 0:
        raise TypeError(f"{type(hf).__name__}.{arch.layers} has no blocks")
    for layer, block in enumerate(blocks):
        where = f"{arch.layers}.{layer}"
        paths = [arch.attn_norm, arch.attn, f"{arch.attn}.{arch.attn_proj}", arch.mlp_norm,
                 arch.mlp] + [f"{arch.mlp}.{p}" for p in arch.mlp_in]
        paths += [p for p in (arch.attn_post_norm, arch.mlp_post_norm) if p]
        for path in paths:
            _check_path(block, path, where, arch)
    return arch


def _check_path(root: nn.Module, path: str, where: str, arch: Architecture) -> None:
    try:
        root.get_submodule(path)
    except AttributeError:
        raise TypeError(
            f"{where} has no module {path!r}, which the {arch.family} description needs "
            f"(config.model_type says {arch.family}); pass an unmodified causal LM such as "
            f"{arch.example}. Supported families: {supported()}."
        ) from None


def architecture_of_suite(arch: SuiteArch) -> Architecture:
    """The family description of a suite's recorded architecture (for files named by module, such
    as export.py's hookpoints), without a model."""
    if arch.family not in ARCHITECTURES:
        raise ValueError(
            f"the suite records model family {arch.family!r}, which this version does not know; "
            f"supported: {supported()}"
        )
    return replace(ARCHITECTURES[arch.family], parallel=arch.parallel)


def check_same(suite_arch: SuiteArch, model_arch: SuiteArch, what: str = "the model") -> None:
    """Raise unless a suite made for `suite_arch` fits a model of `model_arch`: same block wiring
    (upstream sets) and same centring P."""
    if (suite_arch.parallel, suite_arch.centred) != (model_arch.parallel, model_arch.centred):
        raise ValueError(
            f"the suite was made for {suite_arch.describe()} but {what} is "
            f"{model_arch.describe()}: its upstream sets or its centring P differ; load the suite "
            "that was trained on this model"
        )


__all__ = [
    "ARCHITECTURES", "Architecture", "Norm", "SuiteArch", "architecture", "architecture_of_suite",
    "centre", "check_same", "hf_model", "norm_scale", "supported",
]
