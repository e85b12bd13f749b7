"""Loading models of the supported families for the suite: fold the MLP-input norm into the
MLP's input projections and wrap with nnsight (docs/method.md §2; the families are described in
dictionary_learning/arch.py)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from .arch import Architecture, architecture, hf_model
from .embedded import EMBEDDED_MODEL, embedded_model_path
from .names import module_names  # noqa: F401  (part of this module's API)

logger = logging.getLogger(__name__)


class ModelInfo(NamedTuple):
    """Shape facts of a supported model that the suite needs."""

    n_layers: int
    d_model: int
    n_ctx: int
    vocab_size: int
    ln_eps: float
    """eps of the MLP-input norm."""
    name: str
    family: str = "gpt2"
    """The model's family (dictionary_learning/arch.py)."""
    parallel: bool = False
    """Whether its blocks are parallel (attention and MLP read the same residual)."""


def check_supported(model) -> Architecture:
    """The model's architecture description; TypeError naming the family list and the module
    that did not match when it is not a supported causal LM."""
    return architecture(model)


def fold_mlp_norm(model) -> None:
    """Fold every block's MLP-input norm into the MLP's input projections, in place; outputs are
    unchanged (docs/method.md §2, `Architecture.fold`)."""
    architecture(model).fold(hf_model(model))


def model_info(model) -> ModelInfo:
    """ModelInfo of an nnsight-wrapped or plain transformers model of a supported family."""
    hf = hf_model(model)
    arch = architecture(hf)
    cfg = hf.config
    block = arch.block(hf, 0)
    return ModelInfo(
        n_layers=len(arch.blocks(hf)),
        d_model=int(cfg.hidden_size),
        n_ctx=int(getattr(cfg, arch.n_ctx_attr)),
        vocab_size=int(cfg.vocab_size),
        ln_eps=arch.norm_eps(block.get_submodule(arch.mlp_norm)),
        name=str(getattr(cfg, "_name_or_path", "") or type(hf).__name__),
        family=arch.family,
        parallel=arch.parallel,
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
    """Load a model of a supported family, fold its MLP-input norm, and wrap it as
    `nnsight.LanguageModel`.

    `name_or_path` is an embedded model (EMBEDDED_MODEL or EMBEDDED_LLAMA, built locally on first
    use), a directory saved with save_pretrained, a Hub id such as "gpt2" (needs network or the HF
    cache), or an already built `PreTrainedModel` (then pass `tokenizer` too; nnsight needs one).
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
        if (embedded := embedded_model_path(name)) is not None:
            src = str(embedded)
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
    arch = architecture(hf)
    hf = hf.to(device=device, dtype=dtype).eval()
    arch.fold(hf)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token='<|endoftext|>'.")
    return _wrap(hf, tokenizer)
