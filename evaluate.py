"""Evaluation of an SCAE suite (docs/method.md §6) with the data hygiene of docs/method.md §7.

Per dictionary: FVU (vanilla and pruned), L0, dead fraction and pruned-vs-vanilla agreement. For
the whole suite: next-token cross-entropy of the clean model, of r_final = x0 (every block
ablated), of the suite's vanilla and pruned reconstructions, CE recovered, and per-dictionary
splice CE (the real model with one module's output replaced by its dictionary's reconstruction).

Hygiene: the BOS position (0) of every context is never reconstructed or scored; CE is computed
only on the predictions made from positions 1..T-2 (of tokens 2..T-1); in splice runs the BOS
position keeps its true activation. Contexts are packed, so there is no padding.

The metric functions are defined once, in dictionary_learning/metrics.py; this module adds the
model runs (unembedding, clean and splice logits). `evaluate_suite` runs them over chunks of
contexts, accumulating sums so the results equal a one-shot computation with bounded memory;
`evaluate_dictionaries` gives the vanilla figures of bare dictionaries over ActivationBatches
(pretraining's held-out check); `report` adds report.json and plots; `python evaluate.py --suite
DIR --out DIR` is the CLI.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dictionary_learning.arch import architecture
from dictionary_learning.batch import ActivationBatch, trace_activations
from dictionary_learning.dictionary import TopKDictionary
from dictionary_learning.files import atomic_write
# The metric functions live in the base layer; they are re-exported here (see __all__) so that
# `evaluate.fvu`, `evaluate.agreement`, ... keep working.
from dictionary_learning.metrics import (
    FVUAccumulator,
    agreement,
    agreement_per_token,
    ce_recovered,
    dead_fraction,
    fired_features,
    fvu,
    l0,
    next_token_ce,
    scored_predictions,
)
from dictionary_learning.model import hf_model, model_info
from dictionary_learning.names import is_transcoder, parse_module_name
from dictionary_learning.validate import check_context, check_ctx_len
from dictionary_learning.safe_load import check_finite, flat_state
from dictionary_learning.suite import SCAESuite
from dictionary_learning.suite_io import check_name, suite_order
from dictionary_learning.unembed import unembed

logger = logging.getLogger("evaluate")

__all__ = [
    "l0", "fired_features", "dead_fraction", "agreement_per_token", "agreement", "ce_recovered",
    "scored_predictions", "next_token_ce", "final_residual", "unembed", "clean_logits",
    "splice_logits", "fvu", "FVUAccumulator", "ModuleMetrics", "CEMetrics", "SuiteEval",
    "evaluate_suite", "DictQuality", "evaluate_dictionaries", "report", "format_table",
    "print_table", "save_plots", "main",
]


# ============================================================================ metric functions


def final_residual(x0_STD: Tensor, outputs: Iterable[Tensor]) -> Tensor:
    """r_final = x0 + sum of the given module outputs (reconstructions or true outputs), fp32."""
    r_STD = x0_STD.float().clone()
    for out_STD in outputs:
        r_STD += out_STD.to(device=r_STD.device, dtype=torch.float32)
    return r_STD


@torch.no_grad()
def clean_logits(model, toks_ST: Tensor) -> Tensor:
    """The model's own logits [S, T, V] (contexts are packed: the attention mask is all ones)."""
    hf = hf_model(model)
    toks_ST = toks_ST.to(next(hf.parameters()).device)
    return hf(input_ids=toks_ST, attention_mask=torch.ones_like(toks_ST), use_cache=False).logits


@torch.no_grad()
def splice_logits(
    model, toks_ST: Tensor, name: str, recon_fn: Callable[[Tensor], Tensor]
) -> Tensor:
    """Logits [S, T, V] of the real model with module `name`'s output replaced by `recon_fn`.

    attn_<l>: attn_out_l (the attention's output, after Gemma-2's post-norm) at positions 1..
    becomes recon_fn(attn_out_l) (an SAE); mlp_<l>: mlp_out_l (the MLP's output, after Gemma-2's
    post-norm) at positions 1.. becomes recon_fn(the MLP's input in this run) (a transcoder).
    recon_fn maps [B, D] to [B, D]. The BOS position keeps its true activation; everything else
    runs for real (forward hooks, removed afterwards).
    """
    hf = hf_model(model)
    arch = architecture(hf)
    n_layers = len(arch.blocks(hf))
    try:
        kind, layer = parse_module_name(name)
    except ValueError:
        layer = None
    if layer is None or layer >= n_layers:
        raise ValueError(
            f"cannot splice {name!r}: use 'attn_<l>' or 'mlp_<l>' with l < {n_layers}."
        )
    block = arch.block(hf, layer)

    def replace(out_STD: Tensor, x_STD: Tensor) -> Tensor:
        S, T, D = x_STD.shape
        recon_BD = recon_fn(x_STD[:, 1:].reshape(-1, D))
        new_STD = out_STD.clone()
        recon_STD = recon_BD.reshape(S, T - 1, -1)
        new_STD[:, 1:] = recon_STD.to(device=out_STD.device, dtype=out_STD.dtype)
        return new_STD

    handles = []
    if kind == "attn":
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            new = replace(out, out)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        handles.append(arch.attn_out_module(block).register_forward_hook(hook))
    else:
        mlp_in: list[Tensor] = []

        def keep_input(module, args):
            mlp_in[:] = [args[0]]

        def hook(module, args, output):
            return replace(output, mlp_in[0])

        # the MLP's input is read first; the output replaced is the MLP's or its post-norm's
        handles.append(block.get_submodule(arch.mlp).register_forward_pre_hook(keep_input))
        handles.append(arch.mlp_out_module(block).register_forward_hook(hook))
    try:
        return clean_logits(model, toks_ST)
    finally:
        for handle in handles:
            handle.remove()


# ================================================================================ evaluation


class ModuleMetrics(NamedTuple):
    """Metrics of one dictionary over all evaluation tokens (the pruned ones are None without
    connections)."""

    fvu_vanilla: float
    """FVU of the vanilla reconstruction of the module's target."""
    fvu_pruned: float | None
    """FVU of the pruned reconstruction (attn SAEs are leaves: equal to fvu_vanilla)."""
    l0: float
    """Mean active features per token, vanilla pass."""
    l0_pruned: float | None
    """Mean active features per token, pruned pass."""
    dead_frac: float
    """Fraction of features never active (vanilla pass) over the evaluation tokens."""
    agreement: float | None
    """Mean over tokens of |A_pruned ∩ A_vanilla| / |A_vanilla| (1 for attn leaves)."""


class CEMetrics(NamedTuple):
    """Next-token cross-entropies (nats) over the scored predictions, and CE recovered."""

    clean: float
    """The model's own logits."""
    ablated: float
    """r_final = x0 (every block ablated)."""
    vanilla: float
    """r_final = x0 + all vanilla reconstructions."""
    pruned: float | None
    """r_final = x0 + attn vanilla + mlp pruned reconstructions (None without connections)."""
    recovered_vanilla: float
    recovered_pruned: float | None
    splice: dict[str, float]
    """{name: CE of the real model with that one module replaced by its dictionary} (may be
    empty)."""


class SuiteEval(NamedTuple):
    """Everything `evaluate_suite` measured."""

    modules: dict[str, ModuleMetrics]
    ce: CEMetrics
    n_contexts: int
    ctx_len: int
    n_tokens: int
    """Scored dictionary tokens (every non-BOS position)."""
    n_predictions: int
    """Scored CE predictions (positions 1..T-2 of every context)."""
    has_connections: bool


class _Sum:
    """A float64 running sum and count (for means over chunks)."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, total: float | Tensor, count: int) -> None:
        self.total += float(total)
        self.count += int(count)

    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan


def _prepare_contexts(
    contexts, n_contexts: int | None, n_tokens: int | None, batch_size: int, n_ctx: int,
) -> tuple[int, int | None, Iterator[Tensor]]:
    """(ctx_len, number of contexts to use or None = all, iterator of checked LongTensor [S, T]
    batches of at most `batch_size` contexts)."""
    if isinstance(contexts, Tensor) and contexts.dim() == 2:
        contexts = list(contexts)
    it = iter(contexts)
    first = next(it, None)
    if first is None:
        raise ValueError(
            "no evaluation contexts were given; pass LongTensors [ctx_len] (token_contexts)."
        )
    ctx_len = int(check_context(first, 0).shape[0])
    check_ctx_len(ctx_len, n_ctx, "the contexts' ctx_len")
    limit = n_contexts
    if n_tokens is not None:
        by_tokens = max(1, math.ceil(n_tokens / (ctx_len - 1)))
        limit = by_tokens if limit is None else min(limit, by_tokens)

    def batches() -> Iterator[Tensor]:
        batch: list[Tensor] = []
        for i, ctx in enumerate(_chain(first, it)):
            if limit is not None and i >= limit:
                break
            batch.append(check_context(ctx, i, ctx_len))
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)

    return ctx_len, limit, batches()


def _chain(first, it):
    yield first
    yield from it


@torch.no_grad()
def evaluate_suite(
    suite: SCAESuite,
    model,
    contexts,
    *,
    n_contexts: int | None = None,
    n_tokens: int | None = None,
    batch_size: int = 8,
    splice: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> SuiteEval:
    """All docs/method.md §6 metrics of `suite` over `contexts` (iterable of LongTensor [T] with
    BOS first, or [S, T]).

    Evaluates `batch_size` contexts at a time, accumulating sums (results equal a one-shot run).
    Stops after `n_contexts` contexts or enough contexts for `n_tokens` non-BOS tokens (whichever
    is smaller; None = all). The suite runs on `device` in `dtype` (it is moved there in place);
    the model runs where it is, in its own dtype. The pruned pass (all-features mode) runs only if
    the suite has connections. `splice=False` skips the 2 x n_layers splice runs per chunk.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    info = model_info(model)
    suite.check_model(model)
    check_finite(flat_state({n: d.state_dict() for n, d in suite.dicts.items()}), "the suite",
                 "Evaluate a finite suite: retrain it or load an earlier copy.")
    suite = suite.to(device=device, dtype=dtype).eval()
    names, pruned_on = suite.names, suite.has_connections
    if not pruned_on:
        logger.info("the suite has no connections: pruned metrics are left out (None)")
    model_device = next(hf_model(model).parameters()).device

    fvu_v = {n: FVUAccumulator() for n in names}
    fvu_p = {n: FVUAccumulator() for n in names}
    l0_v = {n: _Sum() for n in names}
    l0_p = {n: _Sum() for n in names}
    agree = {n: _Sum() for n in names}
    fired = {
        n: torch.zeros(suite.dicts[n].dict_size, dtype=torch.bool, device=device) for n in names
    }
    ce = {k: _Sum() for k in ("clean", "ablated", "vanilla", "pruned")}
    ce_splice = {n: _Sum() for n in names} if splice else {}
    n_ctx_seen, ctx_len = 0, 0

    total = len(contexts) if hasattr(contexts, "__len__") else None
    _, limit, batches = _prepare_contexts(contexts, n_contexts, n_tokens, batch_size, info.n_ctx)
    if limit is not None:
        total = limit if total is None else min(total, limit)
    bar = tqdm(total=total, unit="ctx", desc="evaluate", disable=not progress)
    for toks_ST in batches:
        toks_ST = toks_ST.to(model_device)
        S, T = toks_ST.shape
        ctx_len = T
        acts = trace_activations(model, toks_ST)
        # token rows: the non-BOS positions of every context
        B = S * (T - 1)

        def flat(t: Tensor) -> Tensor:  # [B, ...] on the suite's device, in its dtype
            t = t[:, 1:]
            return t.reshape(B, *t.shape[2:]).to(device=device, dtype=dtype)

        batch = ActivationBatch.from_trace({k: flat(v) for k, v in acts.items()}, suite.n_layers)
        tgt = batch.tgt
        vanilla = suite.vanilla_forward(batch)
        pruned = suite.pruned_forward(batch, vanilla, mode="all") if pruned_on else {}
        for n in names:
            van = vanilla[n]
            fvu_v[n].update(tgt[n], van.recon_BD)
            l0_v[n].add((van.feats.vals_BK > 0).sum(), B)
            fired[n] |= fired_features(van.feats, suite.dicts[n].dict_size)
            if pruned_on:
                pr = pruned.get(n, van)  # attn SAEs are leaves: pruned = vanilla
                fvu_p[n].update(tgt[n], pr.recon_BD)
                l0_p[n].add((pr.feats.vals_BK > 0).sum(), B)
                a_B = agreement_per_token(van.feats, pr.feats)
                ok = ~a_B.isnan()
                agree[n].add(a_B[ok].double().sum(), int(ok.sum()))

        # suite CE: r_final at non-BOS positions; position 0 (never scored) is filled with x0
        def suite_ce(recons: dict[str, Tensor]) -> tuple[Tensor, int]:
            x0_STD = acts["initial"]
            r_STD = x0_STD.float().clone()
            recons_STD = (recons[n].view(S, T - 1, -1) for n in names)
            r_STD[:, 1:] = final_residual(x0_STD[:, 1:], recons_STD)
            return next_token_ce(unembed(model, r_STD), toks_ST, "sum"), S * (T - 2)

        n_pred = S * (T - 2)
        ce["clean"].add(next_token_ce(clean_logits(model, toks_ST), toks_ST, "sum"), n_pred)
        ce["ablated"].add(next_token_ce(unembed(model, acts["initial"]), toks_ST, "sum"), n_pred)
        ce["vanilla"].add(*suite_ce({n: vanilla[n].recon_BD for n in names}))
        if pruned_on:
            ce["pruned"].add(*suite_ce({n: pruned.get(n, vanilla[n]).recon_BD for n in names}))
        for n in ce_splice:
            ae = suite.dicts[n]
            def recon_fn(x_BD: Tensor, ae=ae) -> Tensor:
                return ae(x_BD.to(device=device, dtype=dtype))
            logits = splice_logits(model, toks_ST, n, recon_fn)
            ce_splice[n].add(next_token_ce(logits, toks_ST, "sum"), n_pred)
            del logits
        n_ctx_seen += S
        bar.update(S)
    bar.close()
    if n_ctx_seen == 0:
        raise ValueError("no evaluation contexts were used (n_contexts=0?); pass at least one.")

    modules = {}
    for n in names:
        modules[n] = ModuleMetrics(
            fvu_vanilla=fvu_v[n].value(),
            fvu_pruned=fvu_p[n].value() if pruned_on else None,
            l0=l0_v[n].mean(),
            l0_pruned=l0_p[n].mean() if pruned_on else None,
            dead_frac=dead_fraction(fired[n]),
            agreement=agree[n].mean() if pruned_on else None,
        )
    c = {k: v.mean() for k, v in ce.items()}
    ce_out = CEMetrics(
        clean=c["clean"],
        ablated=c["ablated"],
        vanilla=c["vanilla"],
        pruned=c["pruned"] if pruned_on else None,
        recovered_vanilla=ce_recovered(c["ablated"], c["vanilla"], c["clean"]),
        recovered_pruned=ce_recovered(c["ablated"], c["pruned"], c["clean"]) if pruned_on else None,
        splice={n: s.mean() for n, s in ce_splice.items()},
    )
    return SuiteEval(
        modules=modules, ce=ce_out, n_contexts=n_ctx_seen, ctx_len=ctx_len,
        n_tokens=n_ctx_seen * (ctx_len - 1), n_predictions=n_ctx_seen * (ctx_len - 2),
        has_connections=pruned_on,
    )


class DictQuality(NamedTuple):
    """Held-out quality of one dictionary (pretraining's check, without a model run)."""

    fvu: float
    """sum ||y - yhat||^2 / sum ||y - mean(y)||^2 over all evaluation tokens."""
    l0: float
    """Mean number of active (> 0) features per token."""
    dead_frac: float
    """Fraction of features never active over the evaluation tokens."""
    n_tokens: int
    """Evaluation tokens."""


@torch.no_grad()
def evaluate_dictionaries(
    dicts: dict[str, TopKDictionary],
    batches: Iterable[ActivationBatch],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, DictQuality]:
    """FVU, L0 and dead fraction of every dictionary over an iterable of ActivationBatch.

    The vanilla metrics of `evaluate_suite` for dictionaries that are not (yet) a suite, e.g.
    pretraining's held-out check; the FVU is over the whole evaluation set, not a batch mean.
    """
    names = suite_order(dicts)
    fvu_acc = {n: FVUAccumulator() for n in names}
    l0_sum = {n: _Sum() for n in names}
    fired: dict[str, Tensor] = {}
    for batch in batches:
        for n in names:
            d = dicts[n]
            kind, _ = check_name(n)
            if n not in batch.src:
                raise KeyError(f"dictionary {n!r} has no activations in the evaluation batch")
            x = batch.src[n].to(device, dtype)
            y = x if kind == "attn" else batch.tgt[n].to(device, dtype)
            recon, feats = d(x, output_features=True)
            fvu_acc[n].update(y, recon)
            l0_sum[n].add((feats.vals_BK > 0).sum(), x.shape[0])
            hit_F = fired_features(feats, d.dict_size)
            fired[n] = hit_F if n not in fired else fired[n] | hit_F
    if not fired:
        raise ValueError("evaluate_dictionaries: no evaluation batches were given")
    return {
        n: DictQuality(fvu=fvu_acc[n].value(), l0=l0_sum[n].mean(),
                       dead_frac=dead_fraction(fired[n]), n_tokens=l0_sum[n].count)
        for n in names
    }


# ==================================================================================== report


def _clean_float(x, path: str = "", nulls: list | None = None):
    """JSON-safe: non-finite floats become None; their paths ("ce.pruned") go to `nulls`."""
    if isinstance(x, float) and not math.isfinite(x):
        if nulls is not None:
            nulls.append((path, x))
        return None
    if isinstance(x, dict):
        return {k: _clean_float(v, f"{path}.{k}".lstrip("."), nulls) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean_float(v, f"{path}[{i}]", nulls) for i, v in enumerate(x)]
    return x


def _why_null(path: str, value: float, ev: SuiteEval) -> str:
    """Why a metric came out NaN/Inf, for the report's notes."""
    leaf = path.rsplit(".", 1)[-1]
    if leaf.startswith("recovered_") and ev.ce.ablated == ev.ce.clean:
        return "CE_ablated equals CE_clean, so CE recovered is undefined"
    if leaf.startswith("fvu"):
        return ("the target activations have zero variance over the evaluation tokens, or the "
                "reconstruction is non-finite")
    if leaf == "agreement":
        return "no evaluation token had an active vanilla feature"
    return "a non-finite model or reconstruction output (check the model and the suite)"


def eval_to_dict(ev: SuiteEval) -> dict:
    """The report dict of a SuiteEval (schema: see `report`). Every metric written as null (a
    NaN/Inf value) gets a note saying which one and why, and a logged warning."""
    notes = []
    if not ev.has_connections:
        notes.append("the suite has no connections: pruned metrics are None (no pruned pass)")
    modules = {}
    for n, m in ev.modules.items():
        kind, layer = parse_module_name(n)
        modules[n] = {"kind": kind, "layer": layer, **m._asdict()}
    nulls: list[tuple[str, float]] = []
    out = _clean_float({
        "modules": modules,
        "ce": ev.ce._asdict(),
        "n_tokens": ev.n_tokens,
        "n_predictions": ev.n_predictions,
        "n_contexts": ev.n_contexts,
        "ctx_len": ev.ctx_len,
        "has_connections": ev.has_connections,
        "notes": notes,
    }, nulls=nulls)
    for path, value in nulls:
        note = f"{path} is null: its value was {value} ({_why_null(path, value, ev)})"
        logger.warning(note)
        out["notes"].append(note)
    return out


def report(
    suite: SCAESuite,
    model,
    contexts,
    *,
    n_contexts: int | None = None,
    n_tokens: int | None = None,
    batch_size: int = 8,
    splice: bool = True,
    out_dir: str | os.PathLike | None = None,
    plots: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> dict:
    """Evaluate the suite (`evaluate_suite`) and return the report dict; write it to
    `out_dir/report.json` (atomically) with PNG plots when `out_dir` is given.

    Schema::

        {"modules": {name: {"kind": "attn"|"mlp", "layer": l, "fvu_vanilla", "fvu_pruned", "l0",
                            "l0_pruned", "dead_frac", "agreement"}},
         "ce": {"clean", "ablated", "vanilla", "pruned", "recovered_vanilla", "recovered_pruned",
                "splice": {name: ce}},
         "n_tokens", "n_predictions", "n_contexts", "ctx_len", "has_connections", "notes",
         "files": {"report": path, "plots": [paths]}}   # "files" only with out_dir

    Pruned entries are None when the suite has no connections (a note says so); for attn SAEs
    (leaves) the pruned figures equal the vanilla ones and agreement is 1. Non-finite numbers are
    written as None.
    """
    ev = evaluate_suite(
        suite, model, contexts, n_contexts=n_contexts, n_tokens=n_tokens, batch_size=batch_size,
        splice=splice, device=device, dtype=dtype, progress=progress,
    )
    rep = eval_to_dict(ev)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        pngs = [str(p) for p in save_plots(rep, out)] if plots else []
        rep["files"] = {"report": str(out / "report.json"), "plots": pngs}
        text = json.dumps(rep, indent=2)
        atomic_write(out / "report.json", lambda fh: fh.write(text.encode()))
    return rep


def save_plots(rep: dict, out_dir: str | os.PathLike) -> list[Path]:
    """fvu_per_layer.png (attn / mlp, vanilla vs pruned), ce.png (clean / vanilla / pruned /
    ablated) and, with splice results, splice_ce.png; written atomically with the Agg canvas
    (no pyplot, so the global matplotlib backend is untouched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    paths = []

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        atomic_write(
            out / name, lambda fh: fig.savefig(fh, format="png", dpi=100, bbox_inches="tight")
        )
        paths.append(out / name)

    mods = rep["modules"]
    fig = Figure(figsize=(9, 3.5))
    for i, kind in enumerate(("attn", "mlp")):
        ax = fig.add_subplot(1, 2, i + 1)
        rows = sorted((m["layer"], m) for m in mods.values() if m["kind"] == kind)
        layers = [l for l, _ in rows]
        ax.plot(layers, [m["fvu_vanilla"] for _, m in rows], "o-", label="vanilla")
        if rep["has_connections"]:
            ax.plot(layers, [m["fvu_pruned"] for _, m in rows], "s--", label="pruned")
        ax.set_title(f"{kind} FVU per layer")
        ax.set_xlabel("layer")
        ax.set_ylabel("FVU")
        ax.set_xticks(layers)
        ax.legend()
    save(fig, "fvu_per_layer.png")

    ce = rep["ce"]
    labels = [k for k in ("clean", "vanilla", "pruned", "ablated") if ce.get(k) is not None]
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(labels, [ce[k] for k in labels], color=["C0", "C1", "C2", "C3"][: len(labels)])
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylabel("next-token CE (nats)")
    ax.set_title("suite CE")
    save(fig, "ce.png")

    if ce.get("splice"):
        names = list(ce["splice"])
        fig = Figure(figsize=(max(5, 0.6 * len(names) + 2), 3.5))
        ax = fig.add_subplot(1, 1, 1)
        vals = [ce["splice"][n] if ce["splice"][n] is not None else math.nan for n in names]
        ax.bar(names, vals, color=["C5" if is_transcoder(n) else "C4" for n in names])
        ax.axhline(ce["clean"], color="k", ls="--", lw=1, label="clean")
        ax.set_ylabel("next-token CE (nats)")
        ax.set_title("splice CE (one dictionary in the real model)")
        ax.tick_params(axis="x", rotation=45)
        ax.legend()
        save(fig, "splice_ce.png")
    return paths


def _fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def format_table(rep: dict) -> str:
    """A text table of the per-module metrics and the CE figures of a report dict."""
    head = (
        f"{'module':<9} {'FVU':>8} {'FVU pr':>8} {'L0':>7} {'L0 pr':>7} {'dead':>7} {'agree':>7} "
        f"{'splice CE':>10}"
    )
    lines = [head, "-" * len(head)]
    splice = rep["ce"].get("splice") or {}
    for n, m in rep["modules"].items():
        dead = "-" if m["dead_frac"] is None else f"{100 * m['dead_frac']:6.1f}%"
        lines.append(
            f"{n:<9} {_fmt(m['fvu_vanilla'], '.4g'):>8} {_fmt(m['fvu_pruned'], '.4g'):>8} "
            f"{_fmt(m['l0'], '.2f'):>7} "
            f"{_fmt(m['l0_pruned'], '.2f'):>7} {dead:>7} {_fmt(m['agreement'], '.3f'):>7} "
            f"{_fmt(splice.get(n)):>10}"
        )
    ce = rep["ce"]
    lines += [
        "",
        f"CE clean {_fmt(ce['clean'])}   ablated (r = x0) {_fmt(ce['ablated'])}",
        f"CE vanilla {_fmt(ce['vanilla'])}   recovered {_fmt(ce['recovered_vanilla'], '.3f')}",
        f"CE pruned  {_fmt(ce['pruned'])}   recovered {_fmt(ce['recovered_pruned'], '.3f')}",
        f"{rep['n_tokens']} tokens, {rep['n_predictions']} scored predictions, "
        f"{rep['n_contexts']} contexts of {rep['ctx_len']}",
    ]
    lines += [f"note: {s}" for s in rep.get("notes", [])]
    return "\n".join(lines)


MODULE_COLUMNS = ("module", "fvu_vanilla", "fvu_pruned", "l0", "l0_pruned", "dead_frac",
                  "agreement", "splice_ce")


def module_rows(rep: dict) -> tuple[list[str], list[list]]:
    """The per-module metrics of a report dict as (columns, rows): for tables (wandb, HTML)."""
    splice = rep["ce"].get("splice") or {}
    rows = [[n] + [m.get(c) for c in MODULE_COLUMNS[1:-1]] + [splice.get(n)]
            for n, m in rep["modules"].items()]
    return list(MODULE_COLUMNS), rows


def print_table(rep: dict) -> None:
    """Print `format_table(rep)`."""
    print(format_table(rep))


# ======================================================================================= CLI


def main(argv: list[str] | None = None) -> dict:
    """CLI: evaluate a saved suite and write report.json, the plots and the printed table."""
    from dictionary_learning.connections import load_connections
    from dictionary_learning.data import (
        check_text_source, embedded_text_source, text_file_source, token_contexts,
    )
    from dictionary_learning.model import load_model
    from dictionary_learning.validate import (
        DTYPES, check_device, check_out_dir, parse_dtype,
    )

    p = argparse.ArgumentParser(description="Evaluate a saved SCAE suite (docs/method.md §6).")
    p.add_argument("--suite", required=True, help="suite folder (save_pretrained) or Hub id")
    p.add_argument(
        "--connections", help="connections file (exchange format); default: the suite's own"
    )
    p.add_argument("--model", help="model name or path; default: the suite meta's model_name")
    p.add_argument(
        "--data", default="embedded", help="'embedded' (validation split) or a text file/dir"
    )
    p.add_argument("--tokens", type=int, default=2**15, help="evaluation tokens (non-BOS)")
    p.add_argument(
        "--ctx-len", type=int, help="context length with BOS; default: the suite's, else 128"
    )
    p.add_argument("--batch-size", type=int, default=8, help="contexts per chunk")
    p.add_argument("--no-splice", action="store_true", help="skip the per-module splice CE runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="suite dtype"
    )
    p.add_argument("--out", required=True, help="output folder for report.json and the plots")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    dtype = parse_dtype(args.dtype)
    # every argument checked before any work (each error names it and the fix)
    check_out_dir(args.out)
    check_device(args.device)
    if args.ctx_len is not None:
        check_ctx_len(args.ctx_len)
    check_text_source(args.data)
    suite = SCAESuite.from_pretrained(args.suite, device=args.device, dtype=dtype)
    meta = getattr(suite, "meta", {}) or {}
    model_name = args.model or meta.get("model_name")
    if not model_name:
        raise SystemExit(
            f"{args.suite}: the suite's meta has no model_name; pass --model NAME_OR_PATH."
        )
    if args.connections:
        suite.set_connections(load_connections(args.connections, suite.dict_sizes,
                                               suite.parallel))
    model = load_model(model_name, device=args.device, dtype=torch.float32)
    info = model_info(model)
    if args.ctx_len is not None:
        check_ctx_len(args.ctx_len, info.n_ctx)
    ctx_len = args.ctx_len or (meta.get("buffer") or {}).get("ctx_len") or 128
    ctx_len = min(int(ctx_len), info.n_ctx)
    if args.data == "embedded":
        texts = embedded_text_source("validation")
    else:
        texts = text_file_source(args.data)
    contexts = token_contexts(texts, model.tokenizer, ctx_len)
    rep = report(
        suite, model, contexts, n_tokens=args.tokens, batch_size=args.batch_size,
        splice=not args.no_splice, out_dir=args.out, device=args.device, dtype=dtype,
    )
    print_table(rep)
    print(f"\nwrote {rep['files']['report']}")
    return rep


if __name__ == "__main__":
    main()
