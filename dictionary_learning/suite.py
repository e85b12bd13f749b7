"""The SCAE suite and its pruned forward pass (docs/method.md §3).

Reading order: `SCAESuite.vanilla_forward` encodes each dictionary's true input;
`SCAESuite.pruned_forward` rebuilds each transcoder's input from its connected upstream features
only, in layer order, with `_pruned_pre` holding the one definition of the pruned pre-activation
for both the candidates mode (training) and the all-features mode (evaluation). The finetuning
trainer (trainers/scae.py), connection search, evaluation and circuits all use this one model.
"""

from __future__ import annotations

import contextlib
import os
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from dictionary_learning.arch import SuiteArch, architecture, centre, centre_rows, check_same
from dictionary_learning.candidates import select_candidates, top_indices
from dictionary_learning.connections import (
    CompiledConnections,
    Connections,
    compile_connections,
    to_exchange,
    validate_connections,
)
from dictionary_learning.dictionary import Features, TopKDictionary, topk_relu
from dictionary_learning.model import model_info
from dictionary_learning.names import (
    is_transcoder,
    module_names,
    parse_module_name,
    upstream_names,
)
from dictionary_learning.sparse_ops import (
    connection_contrib_all,
    connection_contrib_candidates,
    dot_at_candidates,
    take_rows,
    virtual_weights,
)
from dictionary_learning.suite_io import load_suite, save_suite
from dictionary_learning.validate import check_candidates

Mode = Literal["all", "candidates"]


class DictOutput(NamedTuple):
    """One dictionary's output in one pass."""

    feats: Features
    """Active features: values [B, K] and indices [B, K]."""
    recon_BD: Tensor
    """Reconstruction of the target."""
    pre_BF: Tensor | None
    """Pre-activations of all features before ReLU/TopK (vanilla pass, all-features mode of the
    pruned pass); None in the candidates mode, and where the training step no longer needs them.
    The vanilla pass's carry no gradient when autograd is on (they choose features; the chosen
    values are recomputed with gradient: `TopKDictionary.encode_with_pre_acts`)."""
    pre_BN: Tensor | None = None
    """Pre-activations of the candidates cand_BN before ReLU/TopK (candidates mode), else None."""
    cand_BN: Tensor | None = None
    """Candidate feature indices (candidates mode), else None. A transcoder's vanilla pass with
    candidates (`SCAESuite.vanilla_one`) has its features at cand_BN[:, :K]."""
    penalty: Tensor | None = None
    """Random-candidate penalty (candidates mode with n_random > 0), a scalar."""


class PrunedTerms(NamedTuple):
    """The feature-independent parts of one transcoder's pruned pre-activation (3.2)."""

    x0_BD: Tensor
    """The embedding x0 of each token."""
    Wc_FD: Tensor
    """The encoder rows P w_i."""
    bias_F: Tensor
    """(sum_u b_dec_u) . P w_i (zero without upstream dictionaries)."""
    V_FC: Tensor | None
    """Virtual weights of the connections (None: the transcoder has no upstream dictionary)."""
    vals_BA: Tensor | None
    """Values of the upstream active features, all upstream dictionaries side by side."""
    idx_BA: Tensor | None
    """Their indices in the global upstream space G."""
    sigma_B1: Tensor
    """The MLP-input norm's scale sigma per token."""


class SCAESuite(nn.Module):
    """An attention SAE and a transcoder per layer, plus the transcoders' upstream connections.

    `arch` is what the suite's mathematics needs of its model's architecture (parallel blocks,
    the centring P); the default is GPT-2's (sequential, LayerNorm)."""

    def __init__(self, dicts: dict[str, TopKDictionary], connections: Connections | None = None,
                 arch: SuiteArch | None = None):
        super().__init__()
        self.arch = arch or SuiteArch()
        """The model architecture the suite is for (saved in its metadata)."""
        if not dicts:
            raise ValueError(
                "a suite needs dictionaries: {'attn_0': SAE, 'mlp_0': transcoder, ...}"
            )
        layers = {parse_module_name(n)[1] for n in dicts}
        self.n_layers = max(layers) + 1
        expected = module_names(self.n_layers)
        missing = [n for n in expected if n not in dicts]
        if missing:
            raise ValueError(
                f"the suite lacks {missing}; it needs an 'attn_<l>' SAE and an 'mlp_<l>' "
                f"transcoder for every layer 0..{self.n_layers - 1}"
            )
        for name, ae in dicts.items():
            if parse_module_name(name)[0] == "attn" and ae.d_in != ae.d_out:
                raise ValueError(
                    f"{name} must be an SAE (d_in == d_out), got {ae.d_in} -> {ae.d_out}"
                )
        dims = {ae.d_out for ae in dicts.values()} | {ae.d_in for ae in dicts.values()}
        if len(dims) != 1:
            raise ValueError(f"all dictionaries must share d_model, got dimensions {sorted(dims)}")
        self.d_model = dims.pop()
        self.names = expected
        self.meta: dict = {}
        """Settings the suite was saved with (model name, buffer, training)."""
        self.dicts = nn.ModuleDict({n: dicts[n] for n in expected})
        self._compiled: dict[str, CompiledConnections] = {}
        # encoder rows P w_i made during a pruned pass: storage address -> (rows, parameter W)
        self._made_rows: dict[int, tuple[Tensor, Tensor]] | None = None
        if connections is not None:
            self.set_connections(connections)

    def check_fits(self, n_layers: int, d_model: int, what: str = "the model",
                   arch: SuiteArch | None = None) -> None:
        """Raise if the suite was made for a model of another width or depth, or (with `arch`,
        the model's) of another block wiring or norm."""
        if d_model != self.d_model:
            raise ValueError(
                f"the suite's dictionaries have d_model={self.d_model} but {what} has "
                f"d_model={d_model}; load the suite that was trained on this model"
            )
        if n_layers != self.n_layers:
            raise ValueError(
                f"the suite has {self.n_layers} layers but {what} has {n_layers}; load the suite "
                f"that was trained on this model"
            )
        if arch is not None:
            check_same(self.arch, arch, what)

    def check_model(self, model, what: str = "the model") -> None:
        """`check_fits` against a model (plain or nnsight-wrapped) of a supported family: depth,
        width, block wiring and norm."""
        info = model_info(model)
        self.check_fits(info.n_layers, info.d_model, what, architecture(model).suite_arch)

    @property
    def parallel(self) -> bool:
        """Whether the model's blocks are parallel (mlp_L's upstream set has no attn_L)."""
        return self.arch.parallel

    def upstream_names(self, down: str) -> list[str]:
        """The dictionaries upstream of transcoder `down` (docs/method.md (1.2))."""
        return upstream_names(down, self.parallel)

    def centre(self, x: Tensor) -> Tensor:
        """P x over the last dimension (rows P w_i of an encoder): centring for LayerNorm models,
        the identity for RMSNorm models (docs/method.md §2)."""
        return centre(x, self.arch.centred)

    # ----------------------------------------------------------------- connections

    @property
    def dict_sizes(self) -> dict[str, int]:
        return {n: ae.dict_size for n, ae in self.dicts.items()}

    @property
    def transcoder_names(self) -> list[str]:
        return [n for n in self.names if is_transcoder(n)]

    @property
    def has_connections(self) -> bool:
        return bool(self._compiled)

    def set_connections(self, connections: Connections) -> None:
        """Validate and compile connections (exchange format). Every transcoder needs an entry."""
        validate_connections(connections, self.dict_sizes, self.parallel)
        missing = [m for m in self.transcoder_names if m not in connections]
        if missing:
            raise ValueError(
                f"connections have no entry for {missing}; give every transcoder an entry "
                f"(an empty dict means no connections)"
            )
        device = self.dicts[self.names[0]].encoder.weight.device
        self._compiled = {
            m: compile_connections(m, connections[m], self.dict_sizes, self.parallel).to(device)
            for m in self.transcoder_names
        }

    @property
    def connections(self) -> Connections:
        """The connections in the exchange format."""
        return {m: to_exchange(c, self.dict_sizes) for m, c in self._compiled.items()}

    def compiled(self, down: str) -> CompiledConnections:
        if down not in self._compiled:
            raise RuntimeError(
                "the suite has no connections; call set_connections(...) with a connections file "
                "(find_top_connections.py) before the pruned pass"
            )
        return self._compiled[down]

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        device = self.dicts[self.names[0]].encoder.weight.device
        self._compiled = {m: c.to(device) for m, c in self._compiled.items()}
        return out

    # ----------------------------------------------------------------- passes

    def _check_batch(self, batch) -> None:
        for name in self.names:
            if name not in batch.src or name not in batch.tgt:
                raise KeyError(
                    f"the batch has no activations for {name!r}; build the buffer from the "
                    "suite's model"
                )
            x = batch.src[name]
            if x.shape[-1] != self.dicts[name].d_in:
                raise ValueError(
                    f"{name}: the batch has width {x.shape[-1]} but the dictionary expects "
                    f"{self.dicts[name].d_in}; the suite does not fit this model (d_model mismatch)"
                )

    def vanilla_one(
        self, name: str, batch, n_threshold: int | None = None, n_random: int = 0,
        generator: torch.Generator | None = None,
    ) -> DictOutput:
        """Dictionary `name` encodes its true input (attn_out, or mlp_in after the folded norm).

        With n_threshold (a transcoder in the candidates mode), its candidates are chosen too
        (`candidates`, cand_BN in the output): their first K are the top K, so one selection
        serves both, and the features are cand_BN[:, :K] in that order."""
        ae = self.dicts[name]
        x_BI = batch.src[name]
        if n_threshold is None or not ae.is_transcoder:
            feats, pre_BF = ae.encode_with_pre_acts(x_BI)
            return DictOutput(feats, ae.decode(feats), pre_BF)
        with torch.no_grad():
            pre_BF = ae.pre_acts(x_BI)
        cand_BN = self.candidates(name, pre_BF, n_threshold, n_random, generator)
        feats = ae.features_at(x_BI, cand_BN[:, : ae.k], pre_BF)
        return DictOutput(feats, ae.decode(feats), pre_BF, cand_BN=cand_BN)

    def vanilla_forward(self, batch) -> dict[str, DictOutput]:
        """The vanilla pass of every dictionary."""
        self._check_batch(batch)
        return {name: self.vanilla_one(name, batch) for name in self.names}

    def pruned_forward(
        self,
        batch,
        vanilla: dict[str, DictOutput] | None = None,
        *,
        mode: Mode = "all",
        n_threshold: int = 0,
        n_random: int = 0,
        generator: torch.Generator | None = None,
        pruned_top: bool = False,
    ) -> dict[str, DictOutput]:
        """Transcoder outputs from connected upstream features only, in layer order.

        Upstream features are the vanilla ones for attention SAEs and the pruned ones for
        transcoders. mode="all" computes every feature (evaluation); mode="candidates" computes
        the vanilla top K, the next n_threshold and n_random random features (training), or the
        candidates already in `vanilla[m].cand_BN`. `pruned_top` (candidates mode) adds the pruned
        pass's own top K, computed without gradient over all features: the K features chosen are
        then exactly those of mode="all" (docs/method.md §3). Without `vanilla`, the vanilla passes
        it needs are run: the attention SAEs' (the upstream features), and in the candidates mode
        the transcoders' (their pre-activations choose the candidates).
        """
        if vanilla is None:
            self._check_batch(batch)
            vanilla = {n: self.vanilla_one(n, batch, n_threshold, n_random, generator)
                       for n in self.names if mode == "candidates" or not is_transcoder(n)}
        up_feats: dict[str, Features] = {}
        out = {}
        with self._rows_recomputed_in_backward():
            for layer in range(self.n_layers):
                a, m = f"attn_{layer}", f"mlp_{layer}"
                up_feats[a] = vanilla[a].feats
                out[m] = self._pruned_transcoder(
                    m, batch, vanilla.get(m), up_feats, mode, n_threshold, n_random, generator,
                    pruned_top,
                )
                up_feats[m] = out[m].feats
        return out

    def candidates(
        self, name: str, vanilla_pre_BF: Tensor, n_threshold: int, n_random: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """cand_BN, N = K + n_threshold + n_random: vanilla top K, the next n_threshold (each part
        in no set order), then random others (`select_candidates`)."""
        ae = self.dicts[name]
        check_candidates(name, ae.k, n_threshold, n_random, ae.dict_size)
        return select_candidates(vanilla_pre_BF.detach(), ae.k, n_threshold, n_random, generator)

    def encoder_rows(self, name: str) -> Tensor:
        """The rows P w_i [F, D] of transcoder `name`'s encoder (docs/method.md §2)."""
        W_FD = self.dicts[name].encoder.weight
        Wc_FD = centre_rows(W_FD, self.arch.centred)
        if self._made_rows is not None and Wc_FD is not W_FD:
            self._made_rows[Wc_FD.untyped_storage().data_ptr()] = (Wc_FD, W_FD)
        return Wc_FD

    @contextlib.contextmanager
    def _rows_recomputed_in_backward(self):
        """Within it, autograd saves the encoder rows P w_i (a copy of each transcoder's encoder
        under LayerNorm's centring) as a recipe: their parameter W, the rows made again from it
        when the backward needs them. Several kernels save them, so each transcoder's [F, D] copy
        would otherwise stay alive from its forward to the end of its backward (peak memory of
        the training step)."""
        made: dict[int, tuple[Tensor, Tensor]] = {}

        def pack(t: Tensor):
            if t.layout != torch.strided or t.device.type == "meta":
                return t
            hit = made.get(t.untyped_storage().data_ptr())
            if hit is None:
                return t
            W_FD = hit[1]
            return W_FD, W_FD._version, t.shape, t.stride(), t.storage_offset()

        def unpack(saved):
            if isinstance(saved, Tensor):
                return saved
            W_FD, version, shape, stride, offset = saved
            if W_FD._version != version:
                # (autograd's own check for a saved tensor changed in place, kept for the recipe)
                raise RuntimeError(
                    "an encoder weight of the suite was modified in place between the pruned "
                    "pass and its backward; call backward() before the optimizer step")
            return self.centre(W_FD.detach()).as_strided(shape, stride, offset)

        self._made_rows = made
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield
        finally:
            self._made_rows = None

    def virtual_weights(self, name: str, Wc_FD: Tensor | None = None) -> Tensor:
        """V [F, C]: V[i, c] = (P w_i) . d_{J[i, c]}, the weight of transcoder `name`'s feature i on
        its c-th connection (zero at padding). Wc_FD: the rows P w_i, if already made."""
        comp = self.compiled(name)
        Wc_FD = self.encoder_rows(name) if Wc_FD is None else Wc_FD
        # decoder rows d_j: the transpose of a feature-major decoder is contiguous (no copy)
        dec_UDs = [self.dicts[u].decoder.weight.T for u in comp.ups]
        return virtual_weights(Wc_FD, dec_UDs, comp.J_FC, comp.groups, comp.pos, comp.cols,
                               comp.crow, comp.tcrow, comp.tcol, comp.tperm)

    def _pruned_terms(self, name: str, batch, up_feats: dict[str, Features]) -> PrunedTerms:
        """The parts of transcoder `name`'s pruned pre-activation (docs/method.md (3.2)) that do
        not depend on which features are computed."""
        comp = self.compiled(name)
        Wc_FD = self.encoder_rows(name)
        sigma_B1 = batch.layernorm_scale[name][:, None]
        if not comp.ups:
            # mlp_0 of parallel blocks reads x0 alone: no upstream dictionary, no connection
            bias_F = Wc_FD.new_zeros(Wc_FD.shape[0])
            return PrunedTerms(batch.initial, Wc_FD, bias_F, None, None, None, sigma_B1)
        # Upstream features in the global index space.
        vals_BA = torch.cat([up_feats[u].vals_BK for u in comp.ups], dim=1)
        idx_BA = torch.cat(
            [up_feats[u].idx_BK + off for u, off in zip(comp.ups, comp.offsets, strict=True)],
            dim=1,
        )
        # (x0 + sum_u b_dec_u) . P w_i is computed as x0 . P w_i + bias_F, so that the gradient
        # of the biases needs no [B, F] @ [F, D] product (x0 is data); as w_i . P b (P is
        # symmetric), so that its backward reads the parameter, not the rows P w_i.
        W_FD = self.dicts[name].encoder.weight
        bias_F = W_FD @ self.centre(sum(self.dicts[u].b_dec for u in comp.ups))
        return PrunedTerms(batch.initial, Wc_FD, bias_F, self.virtual_weights(name, Wc_FD),
                           vals_BA, idx_BA, sigma_B1)

    def _pruned_pre(
        self,
        name: str,
        batch,
        up_feats: dict[str, Features],
        cand_BN: Tensor | None,
        terms: PrunedTerms | None = None,
    ) -> Tensor:
        """The pruned pre-activations of transcoder `name` (docs/method.md §3), for candidates or
        all.

        pre_i = [w_i.P x0 + sum_u w_i.P b_dec_u + sum_{(u,j) in conn(i)} f_uj (w_i.P d_uj)] / sigma
                + b_enc_i
        """
        comp = self.compiled(name)
        b_enc_F = self.dicts[name].encoder.bias
        t = terms if terms is not None else self._pruned_terms(name, batch, up_feats)
        connected = t.V_FC is not None  # else no upstream dictionary (see _pruned_terms)
        if cand_BN is None:
            base_BF = torch.addmm(t.bias_F, t.x0_BD, t.Wc_FD.T)
            if connected:
                # in place (addmm's backward keeps its inputs, not its output): one [B, F] less
                base_BF += connection_contrib_all(
                    t.vals_BA, t.idx_BA, t.V_FC, comp.J_FC, comp.n_up, comp.transposed
                )
            return torch.addcdiv(b_enc_F, base_BF, t.sigma_B1)
        # At the candidates only: x0 . P w_i by `dot_at_candidates` (sampled where N << F); the
        # per-feature vectors by take_rows, whose backward adds in a fixed order.
        base_BN = dot_at_candidates(t.x0_BD, t.Wc_FD, cand_BN) + take_rows(t.bias_F, cand_BN)
        if connected:
            base_BN = base_BN + connection_contrib_candidates(
                t.vals_BA, t.idx_BA, t.V_FC, comp.J_FC, cand_BN, comp.n_up, comp.transposed
            )
        return torch.addcdiv(take_rows(b_enc_F, cand_BN), base_BN, t.sigma_B1)

    def _pruned_transcoder(
        self, name, batch, vanilla_out: DictOutput | None, up_feats, mode, n_threshold, n_random,
        generator, pruned_top=False,
    ) -> DictOutput:
        ae = self.dicts[name]
        if mode == "all":
            pre_BF = self._pruned_pre(name, batch, up_feats, None)
            feats = topk_relu(pre_BF, ae.k)
            return DictOutput(feats, ae.decode(feats), pre_BF)
        if mode != "candidates":
            raise ValueError(f"mode must be 'all' or 'candidates', got {mode!r}")
        if vanilla_out is None:
            raise KeyError(f"`vanilla` has no entry for {name!r}: the candidates mode chooses from "
                           f"each transcoder's vanilla pass; pass suite.vanilla_forward(batch)")
        cand_BN = vanilla_out.cand_BN
        if cand_BN is None:
            cand_BN = self.candidates(name, vanilla_out.pre_BF, n_threshold, n_random, generator)
        n_top = ae.k + n_threshold
        terms = self._pruned_terms(name, batch, up_feats)
        if pruned_top:
            # The pruned pass's own top K (over all features, no gradient) joins the candidates,
            # so that the K chosen below are those the all-features pass chooses: a feature that
            # fires in the pruned pass only is then trained down instead of never seen.
            with torch.no_grad():
                frozen = PrunedTerms(*(t.detach() if t is not None else None for t in terms))
                own_BK = top_indices(self._pruned_pre(name, batch, up_feats, None, frozen), ae.k)
            cand_BN = torch.cat([cand_BN, own_BK], dim=1)
        pre_BN = self._pruned_pre(name, batch, up_feats, cand_BN, terms)
        top = pre_BN[:, :n_top]
        pool_BN, pos_N = top, torch.arange(n_top, device=cand_BN.device)
        if pruned_top:
            # one slot per feature: an own-top feature already among the main candidates is out
            dup_BK = (own_BK[:, :, None] == cand_BN[:, None, :n_top]).any(dim=-1)
            pool_BN = torch.cat([top, pre_BN[:, -ae.k:].masked_fill(dup_BK, float("-inf"))], 1)
            n_cand = cand_BN.shape[1]
            pos_N = torch.cat([pos_N, torch.arange(n_cand - ae.k, n_cand, device=pos_N.device)])
        sel_BK = top_indices(pool_BN, ae.k)
        sel_vals_BK = pool_BN.gather(1, sel_BK)
        feats = Features(sel_vals_BK.relu(), cand_BN.gather(1, pos_N[sel_BK]))
        penalty = None
        if n_random > 0:
            floor_B1 = top.min(dim=1, keepdim=True).values
            penalty = (pre_BN[:, n_top : n_top + n_random] - floor_B1).relu().sum(1).mean()
        return DictOutput(feats, ae.decode(feats), None, pre_BN, cand_BN, penalty)

    # ----------------------------------------------------------------- files

    def save_pretrained(self, path: str | os.PathLike, meta: dict | None = None) -> None:
        """Save dictionaries, connections and `meta` (default: self.meta) as a suite folder."""
        conns = self.connections if self.has_connections else None
        meta = {k: v for k, v in (self.meta if meta is None else meta).items()
                if k not in ("format", "format_version", "dictionaries", "versions")}
        meta["architecture"] = self.arch.to_meta()
        save_suite(path, dict(self.dicts.items()), meta, conns)

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike, device="cpu", dtype=torch.float32,
        connections: Connections | None = None,
    ) -> "SCAESuite":
        """Load a suite folder (ours, or the original SCAE fork's Hub layout), local or a Hub id.
        Its architecture is the one its metadata records (GPT-2's when it records none)."""
        files = load_suite(path_or_repo_id, device=device, dtype=dtype)
        suite = cls(files.dicts, connections if connections is not None else files.connections,
                    arch=SuiteArch.from_meta(files.meta))
        suite.meta = dict(files.meta)
        return suite.to(device=device, dtype=dtype)
