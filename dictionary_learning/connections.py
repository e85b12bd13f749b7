"""Connections between dictionaries: the exchange format, its validation, and the compiled layout.

Exchange format (docs/formats.md §3, the original fork's): a dict
{down_name: {up_name: LongTensor[F_down, C_up]}} of indices into up_name's features, -1 padding.
Names are "attn_<l>" and "mlp_<l>"; only transcoders ("mlp_<l>") have connections, and their
upstream modules are attn_l for l <= L and mlp_l for l < L (l < L for both with parallel blocks,
docs/method.md (1.2)).

`compile_connections` turns one downstream entry into the layout the sparse kernels use: a global
index space over all upstream dictionaries (in layer order) and J [F, C] with padding = n_up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from .files import atomic_torch_save
from .names import parse_module_name, upstream_names
from .safe_load import load_tensor_file
from .sparse_ops import TransposedConnections, csr_pointers, transpose_connections

Connections = dict[str, dict[str, Tensor]]

def validate_connections(
    conns: Connections, dict_sizes: dict[str, int], parallel: bool = False
) -> None:
    """Check names, upstream order, shapes, dtypes and index ranges; raise naming the culprit.

    dict_sizes: {module name: number of features} of the suite the connections are for;
    parallel: whether its model's blocks are parallel (then attn_L is not upstream of mlp_L).
    """
    if not isinstance(conns, dict):
        raise TypeError(
            f"connections must be a dict {{down: {{up: LongTensor[F_down, C]}}}}, got "
            f"{type(conns).__name__}; load a file written by find_top_connections.save_connections"
        )
    for down, ups in conns.items():
        parse_module_name(down)
        if down not in dict_sizes:
            raise ValueError(
                f"connections name downstream module {down!r}, which the suite does not have "
                f"(suite modules: {sorted(dict_sizes)}); the file was made for another suite"
            )
        allowed = upstream_names(down, parallel)
        if not isinstance(ups, dict):
            raise TypeError(
                f"connections[{down!r}] must be a dict {{up_name: LongTensor}}, "
                f"got {type(ups).__name__}"
            )
        F_down = dict_sizes[down]
        for up, idx in ups.items():
            where = f"connections[{down!r}][{up!r}]"
            parse_module_name(up)
            if up not in allowed:
                rule = ("attn_l and mlp_l for l < L: the blocks are parallel, so mlp_L reads the "
                        "block's input, not attn_L" if parallel
                        else "attn_l for l <= L, mlp_l for l < L")
                span = f"{allowed[0]} .. {allowed[-1]}" if allowed else "none"
                raise ValueError(
                    f"{where}: {up!r} is not upstream of {down!r}; upstream modules of {down} are "
                    f"{span} ({rule})"
                )
            if up not in dict_sizes:
                raise ValueError(f"{where}: the suite has no module {up!r}")
            _check_index_dtype(idx, where)
            if idx.dim() != 2 or idx.shape[0] != F_down:
                raise ValueError(
                    f"{where} has shape {tuple(idx.shape)}; expected [F_down={F_down}, C]: one row "
                    f"per feature of {down}. Was the file made for a suite with another dict_size?"
                )
            F_up = dict_sizes[up]
            bad = (idx < -1) | (idx >= F_up)
            if bad.any():
                i, c = (int(v) for v in bad.nonzero()[0])
                raise ValueError(
                    f"{where}: index {int(idx[i, c])} at feature {i}, slot {c} is out of range for "
                    f"{up} with {F_up} features; indices must be in [0, {F_up}) or -1 for padding"
                )
            if idx.shape[1] > 1:
                s = idx.sort(dim=1).values
                dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
                if dup.any():
                    i = int(dup.nonzero()[0, 0])
                    raise ValueError(
                        f"{where}: feature {i} lists upstream feature {int(s[i][1:][dup[i]][0])} "
                        f"more than once; each connection may appear once"
                    )


def save_connections(conns: Connections, path: str | os.PathLike) -> None:
    """torch.save the exchange format atomically (temp file, then rename)."""
    plain = {
        d: {u: t.detach().to("cpu", torch.int64) for u, t in ups.items()}
        for d, ups in conns.items()
    }
    atomic_torch_save(plain, path)


def load_connections(
    path: str | os.PathLike, dict_sizes: dict[str, int] | None = None, parallel: bool = False
) -> Connections:
    """Read a connections file (torch.save, or the original fork's plain pickle of tensors) without
    running code from it; check its structure and integer dtypes, and validate it against the
    suite when `dict_sizes` is given (`parallel`: the suite's blocks are parallel)."""
    path = Path(path)
    fix = ("Pass a connections file in the exchange format {down: {up: LongTensor[F_down, C]}}, "
           "e.g. one written by `python find_top_connections.py`.")
    conns = load_tensor_file(path, "connections file", fix)
    if not isinstance(conns, dict):
        raise TypeError(
            f"{str(path)!r} holds a {type(conns).__name__}, not a dict "
            "{down: {up: LongTensor}}; pass a connections file in the exchange format"
        )
    for down, ups in conns.items():
        if not isinstance(ups, dict):
            raise TypeError(
                f"{str(path)!r}: connections[{down!r}] is a {type(ups).__name__}, not a dict "
                f"{{up_name: LongTensor}}. {fix}"
            )
        for up, idx in ups.items():
            _check_index_dtype(idx, f"{str(path)!r}: connections[{down!r}][{up!r}]")
    conns = {d: {u: t.long() for u, t in ups.items()} for d, ups in conns.items()}
    if dict_sizes is not None:
        try:
            validate_connections(conns, dict_sizes, parallel)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{str(path)!r}: {exc}") from None
    return conns


def _check_index_dtype(idx, where: str) -> None:
    """Connections are feature indices: integer tensors only (a float file is refused)."""
    if not isinstance(idx, Tensor):
        raise TypeError(f"{where} must be an integer tensor, got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        hint = (" Connections are feature indices: if the values are whole numbers, convert the "
                "file with {d: {u: t.long() ...}} and save it again." if idx.is_floating_point()
                else "")
        raise TypeError(f"{where} must be an integer tensor (int64), got {idx.dtype}.{hint}")


# Upstream modules whose virtual weights are one kernel call: consecutive modules while their
# features total at most this many (a larger module alone). The backward holds a group's decoder
# gradients together (25 MB at d_model 768 in fp32); at gpt2-small widths every module is its own
# group, at the default suite's one group holds all (7 calls fewer, and 6 [F, D] gradients fewer
# to add, for its last transcoder).
VW_GROUP_FEATURES = 1 << 13


class CompiledConnections(NamedTuple):
    """One transcoder's connections in the kernels' layout."""

    ups: tuple[str, ...]
    """Upstream modules in layer order; their features are concatenated in this order."""
    offsets: tuple[int, ...]
    """Start of each upstream module in the global index space."""
    n_up: int
    """Size of the global upstream index space; also the padding index of J."""
    J_FC: Tensor
    """Global upstream index of each connection, sorted per row, padded with n_up."""
    groups: tuple[tuple[int, int], ...]
    """Groups of consecutive upstream modules (ups[first:stop]) whose virtual weights are
    computed together (`VW_GROUP_FEATURES`); their features are numbered one module after the
    other (group-local columns)."""
    pos: tuple[Tensor, ...]
    """Per group: flat positions in J_FC of the slots that point into it."""
    cols: tuple[Tensor, ...]
    """Per group: the group-local upstream feature index of those slots."""
    crow: tuple[Tensor, ...] = ()
    """Per group: CSR row pointers [F + 1] of the [F, F_group] pattern whose column indices are
    `cols` (rows ascend with `pos`, columns ascend within a row since J_FC is sorted)."""
    tcrow: tuple[Tensor, ...] = ()
    """Per group: CSR row pointers [F_group + 1] of the transposed pattern [F_group, F]."""
    tcol: tuple[Tensor, ...] = ()
    """Per group: column (downstream feature) indices of the transposed pattern."""
    tperm: tuple[Tensor, ...] = ()
    """Per group: order of the group's slots in the transposed pattern
    (tvalues = values[tperm])."""
    transposed: TransposedConnections | None = None
    """All of J's connections by global upstream feature, for the connection term's C kernels:
    kept on the CPU whatever the suite's device (they run there only)."""

    def to(self, device) -> "CompiledConnections":
        mv = lambda ts: tuple(t.to(device) for t in ts)  # noqa: E731
        return self._replace(
            J_FC=self.J_FC.to(device), pos=mv(self.pos), cols=mv(self.cols), crow=mv(self.crow),
            tcrow=mv(self.tcrow), tcol=mv(self.tcol), tperm=mv(self.tperm),
        )


def virtual_weight_groups(sizes: list[int]) -> tuple[tuple[int, int], ...]:
    """(first, stop) of each group of consecutive modules of these sizes: modules join a group
    while its features total at most VW_GROUP_FEATURES."""
    groups, first, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > first and total + n > VW_GROUP_FEATURES:
            groups.append((first, i))
            first, total = i, 0
        total += n
    if sizes:
        groups.append((first, len(sizes)))
    return tuple(groups)


def compile_connections(
    down: str, ups_idx: dict[str, Tensor], dict_sizes: dict[str, int], parallel: bool = False
) -> CompiledConnections:
    """Global layout for `down` from its exchange-format entry (validated beforehand), over the
    upstream set of (1.2) (without attn_L when `parallel`)."""
    ups = tuple(upstream_names(down, parallel))
    F_down = dict_sizes[down]
    offsets, n_up = [], 0
    for u in ups:
        offsets.append(n_up)
        n_up += dict_sizes[u]
    parts = [torch.full((F_down, 0), n_up, dtype=torch.int64)]
    for u, off in zip(ups, offsets, strict=True):
        if u in ups_idx:
            idx = ups_idx[u].to("cpu", torch.int64)
            parts.append(torch.where(idx >= 0, idx + off, n_up))
    J_FC = torch.cat(parts, dim=1).sort(dim=1).values
    C = int((J_FC < n_up).sum(1).max()) if J_FC.numel() else 0
    J_FC = J_FC[:, :C].contiguous()
    flat = J_FC.flatten()
    groups = virtual_weight_groups([dict_sizes[u] for u in ups])
    pos, cols, crow, tcrow, tcol, tperm = [], [], [], [], [], []
    for first, stop in groups:
        lo = offsets[first]
        F_g = sum(dict_sizes[u] for u in ups[first:stop])
        p = ((flat >= lo) & (flat < lo + F_g)).nonzero().squeeze(1)
        c = flat[p] - lo
        rows = p // max(C, 1)
        pos.append(p)
        cols.append(c)
        crow.append(csr_pointers(rows, F_down))
        order = torch.argsort(c, stable=True)  # transposed pattern: by column, then by row
        tperm.append(order)
        tcol.append(rows[order])
        tcrow.append(csr_pointers(c, F_g))
    return CompiledConnections(
        ups, tuple(offsets), n_up, J_FC, groups, tuple(pos), tuple(cols),
        tuple(crow), tuple(tcrow), tuple(tcol), tuple(tperm), transpose_connections(J_FC, n_up),
    )


def to_exchange(comp: CompiledConnections, dict_sizes: dict[str, int]) -> dict[str, Tensor]:
    """Back to {up: LongTensor[F_down, C_up]} (-1 padded), the inverse of compile_connections."""
    F, C = comp.J_FC.shape
    flat = comp.J_FC.flatten()
    out = {}
    for u, off in zip(comp.ups, comp.offsets, strict=True):
        p = ((flat >= off) & (flat < off + dict_sizes[u])).nonzero().squeeze(1)
        c = flat[p] - off
        rows = p // max(C, 1)
        counts = torch.bincount(rows, minlength=F)
        width = int(counts.max()) if counts.numel() and p.numel() else 0
        idx = torch.full((F, width), -1, dtype=torch.int64, device=c.device)
        slot = torch.arange(p.numel(), device=c.device) - (torch.cumsum(counts, 0) - counts)[rows]
        idx[rows, slot] = c
        out[u] = idx
    return out
