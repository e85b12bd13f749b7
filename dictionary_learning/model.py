"""Loading GPT-2-family models for the suite: fold ln_2 into mlp.c_fc and wrap with nnsight
(docs/method.md §2)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from .names import module_names  # noqa: F401  (part of this module's API)

from .embedded import EMBEDDED_MODEL, ensure_embedded_model

logger = logging.getLogger(__name__)


class ModelInfo(NamedTuple):
    """Shape facts of a GPT-2-like model that the suite needs."""

    n_layers: int
    d_model: int
    n_ctx: int
    vocab_size: int
    ln_eps: float
    name: str


def hf_model(model) -> torch.nn.Module:
    """The underlying transformers model of an nnsight model (or the model itself if plain)."""
    inner = model.__dict__.get("_module") if hasattr(model, "__dict__") else None
    return inner if isinstance(inner, torch.nn.Module) else model


_hf = hf_model


def check_gpt2_like(model) -> None:
    """Raise TypeError unless the model has transformer.h[l] blocks with attn, ln_2, mlp.c_fc."""
    hf = _hf(model)
    blocks = getattr(getattr(hf, "transformer", None), "h", None)
    ok = blocks is not None and len(blocks) > 0
    if ok:
        for b in blocks:
            has_mlp_c_fc = hasattr(getattr(b, "mlp", None), "c_fc")
            if not (hasattr(b, "attn") and hasattr(b, "ln_2") and has_mlp_c_fc):
                ok = False
                break
    if not ok:
        raise TypeError(
            f"model {type(hf).__name__} is not GPT-2-like: the suite needs transformer.h[l].attn / "
            "ln_2 / mlp (with mlp.c_fc); pass a GPT-2-family model (e.g. GPT2LMHeadModel)."
        )


@torch.no_grad()
def fold_ln2(hf_model) -> None:
    """Fold every block's ln_2 affine into mlp.c_fc in place; outputs are unchanged.

    Conv1D computes x @ W + b with W [d_in, d_out] and LN(x) = gamma * Px/sigma + beta, so
    W <- gamma[:, None] W and b <- b + beta @ W (original W); then gamma = 1, beta = 0. Folding an
    already folded model is a no-op. The arithmetic is done in fp32 and cast back.
    """
    check_gpt2_like(hf_model)
    for block in _hf(hf_model).transformer.h:
        ln, fc = block.ln_2, block.mlp.c_fc
        W_DH = fc.weight.float()
        gamma_D = ln.weight.float() if ln.weight is not None else torch.ones(W_DH.shape[0])
        beta_D = ln.bias.float() if ln.bias is not None else torch.zeros(W_DH.shape[0])
        if W_DH.shape[0] != gamma_D.shape[0]:
            raise TypeError(
                f"mlp.c_fc weight has shape {tuple(W_DH.shape)}, expected [d_model, d_mlp] (GPT-2 "
                "Conv1D layout); pass a GPT-2-family model."
            )
        new_b = fc.bias.float() + beta_D @ W_DH
        fc.weight.copy_((gamma_D[:, None] * W_DH).to(fc.weight.dtype))
        fc.bias.copy_(new_b.to(fc.bias.dtype))
        if ln.weight is not None:
            ln.weight.fill_(1.0)
        if ln.bias is not None:
            ln.bias.zero_()


def model_info(model) -> ModelInfo:
    """ModelInfo of an nnsight-wrapped or plain transformers GPT-2-like model."""
    hf = _hf(model)
    check_gpt2_like(hf)
    cfg = hf.config
    return ModelInfo(
        n_layers=len(hf.transformer.h),
        d_model=cfg.n_embd,
        n_ctx=cfg.n_positions,
        vocab_size=cfg.vocab_size,
        ln_eps=float(hf.transformer.h[0].ln_2.eps),
        name=str(getattr(cfg, "_name_or_path", "") or type(hf).__name__),
    )


def _wrap(hf_model, tokenizer):
    import nnsight

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LanguageModel is deprecated.*")
        return nnsight.LanguageModel(hf_model, tokenizer=tokenizer)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return (
        1 <= len(parts) <= 2
        and all(p and not p.startswith(".") for p in parts)
        and not name.startswith(("/", "~"))
    )


def load_model(
    name_or_path=EMBEDDED_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer=None,
):
    """Load a GPT-2-family model, fold ln_2, and wrap it as `nnsight.LanguageModel`.

    `name_or_path` is EMBEDDED_MODEL (built locally on first use), a directory saved with
    save_pretrained, a Hub id such as "gpt2" (needs network or the HF cache), or an already built
    `PreTrainedModel` (then pass `tokenizer` too; a tokenizer is required by nnsight).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype {dtype} is not supported; use torch.float32 or torch.bfloat16.")
    if isinstance(name_or_path, PreTrainedModel):
        hf = name_or_path
        if tokenizer is None:
            raise ValueError(
                "a PreTrainedModel was passed without a tokenizer; pass tokenizer=<a "
                "PreTrainedTokenizerFast> (nnsight needs one)."
            )
    elif isinstance(name_or_path, (str, Path)):
        name = str(name_or_path)
        if name == EMBEDDED_MODEL:
            src = str(ensure_embedded_model())
        elif Path(name).expanduser().is_dir():
            src = str(Path(name).expanduser())
        elif _looks_like_hub_id(name):
            src = name
        else:
            raise ValueError(
                f"unknown model {name!r}: not a local directory and not a Hub id; pass a directory "
                f"saved with save_pretrained, 'gpt2', or {EMBEDDED_MODEL!r}."
            )
        try:
            hf = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(src)
        except OSError as exc:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            if src == name and not Path(name).exists():
                why = (
                    "HF_HUB_OFFLINE is set" if offline else "there is no network or no such Hub id"
                )
                raise ValueError(
                    f"could not load model {name!r} from the Hub ({why}) and it is not in the "
                    f"local HF cache: pass a local directory saved with save_pretrained, or "
                    f"{EMBEDDED_MODEL!r} (built locally). Original error: {exc}"
                ) from exc
            raise FileNotFoundError(
                f"could not load a model from {src!r}: {exc}. Pass a directory written by "
                "model.save_pretrained() and tokenizer.save_pretrained()."
            ) from exc
    else:
        raise TypeError(
            f"name_or_path is a {type(name_or_path).__name__}; pass a str (path, Hub id or "
            f"{EMBEDDED_MODEL!r}) or a transformers PreTrainedModel."
        )
    check_gpt2_like(hf)
    hf = hf.to(device=device, dtype=dtype).eval()
    fold_ln2(hf)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token='<|endoftext|>'.")
    return _wrap(hf, tokenizer)
