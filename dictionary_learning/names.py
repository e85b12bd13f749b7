"""Names of the suite's dictionaries: "attn_<l>" (SAE on attn_out_l) and "mlp_<l>" (transcoder)."""

from __future__ import annotations

import re

_NAME_RE = re.compile(r"^(attn|mlp)_(\d+)$")


def parse_module_name(name: str) -> tuple[str, int]:
    """("attn" | "mlp", layer) from "attn_<l>" / "mlp_<l>"."""
    m = _NAME_RE.match(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(
            f"unknown module name {name!r}: module names are 'attn_<layer>' or 'mlp_<layer>'"
        )
    return m.group(1), int(m.group(2))


def is_transcoder(name: str) -> bool:
    """Whether `name` is a transcoder ("mlp_<l>"), not an attention SAE ("attn_<l>")."""
    return parse_module_name(name)[0] == "mlp"


def layer_of(name: str) -> int:
    """The layer l of "attn_<l>" / "mlp_<l>"."""
    return parse_module_name(name)[1]


def module_names(n_layers: int) -> list[str]:
    """Dictionary names in execution order: ["attn_0", "mlp_0", "attn_1", "mlp_1", ...]."""
    return [f"{kind}_{layer}" for layer in range(n_layers) for kind in ("attn", "mlp")]


def suite_order(names) -> list[str]:
    """Names sorted in execution order: attn_0, mlp_0, attn_1, ..."""
    def order(n):
        kind, layer = parse_module_name(n)
        return layer, kind != "attn"

    return sorted(names, key=order)


def upstream_names(down: str, parallel: bool = False) -> list[str]:
    """The modules upstream of transcoder `down`, in execution order (docs/method.md (1.2)):
    attn_0, mlp_0, ..., mlp_{L-1}, attn_L for sequential blocks; without attn_L for parallel ones
    (GPT-NeoX's parallel residual), whose MLP reads the block's input, not attention's output."""
    kind, L = parse_module_name(down)
    if kind != "mlp":
        raise ValueError(
            f"{down!r} is an attention SAE, a leaf: only 'mlp_<l>' modules have inputs"
        )
    return module_names(L) + ([] if parallel else [f"attn_{L}"])
