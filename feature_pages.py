"""Feature pages of an SCAE suite: one streaming pass over held-out text, bounded memory.

    python feature_pages.py --suite DIR --tokens 65536 --out pages.pt [--features-dir DIR]

For every feature of every dictionary, over N held-out tokens:

- the top-activating contexts (one per context), in the pruned pass for transcoders and in the
  vanilla pass for every dictionary, each with a window of per-token activations;
- a uniform sample of the contexts where it fires, split into quantile groups;
- an activation histogram (log-spaced bins) and the firing frequency;
- the top and bottom logit effects of its decoder direction through the final norm's gain and the
  unembedding;
- for a transcoder feature, its connections: the upstream feature, the virtual weight, the mean
  contribution when both are active, and the fraction of its pre-activation they explain;
- the downstream features that list it as a connection.

Memory: a running top-k per feature (values, context ids, windows), merged batch by batch; only
one batch of dense [tokens, F] activations exists at a time, never an [N, F] tensor.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dictionary_learning.batch import ActivationBatch, trace_activations
from circuits import connection_terms, feature_id, process_token
from dictionary_learning.arch import architecture, centre
from dictionary_learning.data import batched_contexts, contexts_from
from dictionary_learning.files import atomic_torch_save, atomic_write_json
from dictionary_learning.model import hf_model
from dictionary_learning.safe_load import load_tensor_file
from dictionary_learning.sparse_ops import csr_pointers
from dictionary_learning.suite import SCAESuite

logger = logging.getLogger("feature_pages")

HIST_EDGES = torch.logspace(-3, 3, 61)
"""Histogram bin edges of positive activations (1e-3 .. 1e3, ten bins per decade)."""


@dataclass
class PageConfig:
    """Settings of the feature-page pass."""

    data: str = "embedded"
    """Held-out text: "embedded" (its validation plays), a text file or folder, a datasets name."""
    split: str = "validation"
    """Split of the text source."""
    n_tokens: int = 2**16
    """Tokens (BOS excluded) the pages are computed over, rounded up to whole contexts."""
    ctx_len: int = 128
    """Context length, BOS included."""
    batch_contexts: int = 16
    """Contexts per model run."""
    n_top: int = 10
    """Top-activating contexts kept per feature and pass."""
    n_sample: int = 16
    """Random firing contexts kept per feature, split into `n_quantiles` groups."""
    n_quantiles: int = 4
    window_before: int = 15
    """Tokens shown before the top token of an example."""
    window_after: int = 4
    """Tokens shown after it."""
    n_logits: int = 10
    """Top and bottom logit effects listed."""
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_tokens < 1 or self.ctx_len < 2 or self.n_top < 1 or self.batch_contexts < 1:
            raise ValueError("PageConfig: n_tokens, n_top and batch_contexts must be >= 1 and "
                             "ctx_len >= 2")
        if self.n_sample % self.n_quantiles:
            raise ValueError(f"PageConfig: n_sample={self.n_sample} must be a multiple of "
                             f"n_quantiles={self.n_quantiles}")


class TopTracker:
    """Running top-k contexts per feature by a score, with a window of activations around the
    context's top token. State is [F, E] and [F, E, W] (E = k examples, W = the window's
    positions); `update` merges one batch."""

    def __init__(self, F: int, k: int, before: int, after: int, device):
        W = before + after + 1
        self.before, self.after = before, after
        self.score_FE = torch.full((F, k), -math.inf, device=device)
        self.value_FE = torch.zeros(F, k, device=device)
        self.ctx_FE = torch.full((F, k), -1, dtype=torch.long, device=device)
        self.pos_FE = torch.zeros(F, k, dtype=torch.long, device=device)
        self.toks_FEW = torch.full((F, k, W), -1, dtype=torch.long, device=device)
        self.acts_FEW = torch.zeros(F, k, W, device=device)

    def update(self, acts_sTF: Tensor, toks_sT: Tensor, ctx_s: Tensor,
               score_sF: Tensor | None = None) -> None:
        """acts [s, T, F] of s contexts; score [s, F] (default: the context's max activation);
        contexts where the feature never fires are never kept."""
        s, T, F = acts_sTF.shape
        max_sF, arg_sF = acts_sTF.max(dim=1)
        score_sF = max_sF if score_sF is None else score_sF
        score_sF = torch.where(max_sF > 0, score_sF, -math.inf)
        offs_W = torch.arange(-self.before, self.after + 1, device=acts_sTF.device)
        pos_sFW = arg_sF[..., None] + offs_W
        valid_sFW = (pos_sFW >= 0) & (pos_sFW < T)
        pos_sFW = pos_sFW.clamp(0, T - 1)
        acts_sWF = acts_sTF.gather(1, pos_sFW.permute(0, 2, 1))
        acts_FsW = acts_sWF.permute(2, 0, 1) * valid_sFW.permute(1, 0, 2)
        toks_FsW = toks_sT.gather(1, pos_sFW.reshape(s, -1)).view(s, F, -1).permute(1, 0, 2)
        toks_FsW = toks_FsW.masked_fill(~valid_sFW.permute(1, 0, 2), -1)
        both_score = torch.cat([self.score_FE, score_sF.T], dim=1)
        keep_FE = both_score.topk(self.score_FE.shape[1], dim=1).indices

        def pick(old, new):
            both = torch.cat([old, new], dim=1)
            idx = keep_FE.view(*keep_FE.shape, *([1] * (both.dim() - 2))).expand(
                -1, -1, *both.shape[2:])
            return both.gather(1, idx)

        self.score_FE = both_score.gather(1, keep_FE)
        self.value_FE = pick(self.value_FE, max_sF.T)
        self.ctx_FE = pick(self.ctx_FE, ctx_s[None].expand(F, -1))
        self.pos_FE = pick(self.pos_FE, arg_sF.T)
        self.toks_FEW = pick(self.toks_FEW, toks_FsW)
        self.acts_FEW = pick(self.acts_FEW, acts_FsW)

    def state(self) -> dict[str, Tensor]:
        keep = self.score_FE > -math.inf
        return {"value": self.value_FE.cpu(), "ctx": self.ctx_FE.cpu(), "pos": self.pos_FE.cpu(),
                "toks": self.toks_FEW.cpu(), "acts": self.acts_FEW.cpu(), "kept": keep.cpu()}


class FeaturePages:
    """The pages of every feature of a suite (tensors; `feature_file` renders one as JSON)."""

    def __init__(self, state: dict):
        self.state = state
        self.vocab: list[str] = state["vocab"]
        self.names: list[str] = state["names"]

    def save(self, path: str | Path) -> Path:
        """torch.save of tensors, lists and numbers (loadable with weights_only=True)."""
        return atomic_torch_save(self.state, path)

    def _examples(self, tr: dict, i: int, order: Tensor | None = None) -> list[dict]:
        slots = order if order is not None else torch.arange(tr["value"].shape[1])
        out = []
        for s in slots.tolist():
            if not tr["kept"][i, s]:
                continue
            toks, acts = tr["toks"][i, s], tr["acts"][i, s]
            ok = toks >= 0
            top = int(ok[: self.state["config"]["window_before"]].sum())
            out.append({"tokens": [process_token(self.vocab[t]) for t in toks[ok].tolist()],
                        "tokens_acts_list": [round(a, 4) for a in acts[ok].tolist()],
                        "train_token_ind": top, "is_repeated_datapoint": False,
                        "context": int(tr["ctx"][i, s]), "position": int(tr["pos"][i, s]),
                        "activation": round(float(tr["value"][i, s]), 4)})
        return out

    def feature_file(self, name: str, i: int) -> dict:
        """Feature `i` of dictionary `name` in circuit-tracer's feature format, plus the SCAE
        fields `connections`, `downstream` and `module`."""
        if name not in self.state["dicts"]:
            raise KeyError(f"no pages for dictionary {name!r}; the pages cover {self.names}")
        d = self.state["dicts"][name]
        F = d["count"].shape[0]
        if not 0 <= i < F:
            raise IndexError(f"{name} has {F} features; index {i} is out of range")
        main = d["top_pruned"] if "top_pruned" in d else d["top_vanilla"]
        quantiles = [{"quantile_name": "Top activations" + (" (pruned pass)" if "top_pruned" in d
                                                            else ""),
                      "examples": self._examples(main, i)}]
        if "top_pruned" in d:
            quantiles.append({"quantile_name": "Top activations (vanilla pass)",
                              "examples": self._examples(d["top_vanilla"], i)})
        sample = d["sample"]
        n_q = self.state["config"]["n_quantiles"]
        kept = sample["kept"][i]
        order = sample["value"][i].masked_fill(~kept, -math.inf).argsort(descending=True)
        order = order[: int(kept.sum())]
        q_values = []
        for q, part in enumerate(order.tensor_split(n_q)):
            if part.numel():
                q_values.append(float(sample["value"][i, part].min()))
            quantiles.append({"quantile_name": f"Subsample interval {q}",
                              "examples": self._examples(sample, i, part)})
        n_tok = self.state["n_tokens"]
        count = int(d["count"][i])
        page = {
            "transcoder_id": name, "index": i, "feature": feature_id(name, i), "module": name,
            "examples_quantiles": quantiles,
            "top_logits": [process_token(self.vocab[t]) for t in d["top_logits"][i].tolist()],
            "bottom_logits": [process_token(self.vocab[t])
                              for t in d["bottom_logits"][i].tolist()],
            "top_logit_values": [round(v, 4) for v in d["top_logit_values"][i].tolist()],
            "bottom_logit_values": [round(v, 4) for v in d["bottom_logit_values"][i].tolist()],
            "act_min": float(d["act_min"][i]) if count else 0.0,
            "act_max": float(d["act_max"][i]) if count else 0.0,
            "quantile_values": q_values,
            "histogram": d["hist"][i].tolist(),
            "histogram_edges": HIST_EDGES.tolist(),
            "activation_frequency": count / max(n_tok, 1),
            "n_tokens": n_tok,
            "connections": self._connections(name, i),
            "downstream": self._downstream(name, i),
        }
        return page

    def _connections(self, name: str, i: int) -> list[dict]:
        c = self.state["dicts"][name].get("conn")
        if c is None:
            return []
        out = []
        for slot in range(c["up_module"].shape[1]):
            m = int(c["up_module"][i, slot])
            if m < 0:
                continue
            n_both, total = int(c["count_both"][i, slot]), float(c["sum_contrib"][i, slot])
            sum_pre = float(c["sum_pre"][i])
            up = self.names[m]
            j = int(c["up_index"][i, slot])
            out.append({"module": up, "index": j, "feature": feature_id(up, j),
                        "virtual_weight": round(float(c["V"][i, slot]), 6),
                        "mean_contribution": round(total / n_both, 6) if n_both else 0.0,
                        "co_active_tokens": n_both,
                        "fraction_of_pre_activation":
                            round(total / sum_pre, 6) if sum_pre else 0.0})
        out.sort(key=lambda r: -abs(r["fraction_of_pre_activation"]) or -abs(r["virtual_weight"]))
        return out

    def _downstream(self, name: str, i: int, limit: int = 50) -> list[dict]:
        down = self.state["dicts"][name]["downstream"]
        lo, hi = int(down["ptr"][i]), int(down["ptr"][i + 1])
        rows = [{"module": self.names[int(m)], "index": int(j),
                 "feature": feature_id(self.names[int(m)], int(j)),
                 "virtual_weight": round(float(v), 6)}
                for m, j, v in zip(down["module"][lo:hi].tolist(), down["index"][lo:hi].tolist(),
                                   down["V"][lo:hi].tolist())]
        rows.sort(key=lambda r: -abs(r["virtual_weight"]))
        return rows[:limit]

    def write_feature_files(self, out_dir: str | Path, features: list[tuple[str, int]] | None
                            = None) -> list[Path]:
        """Write `<out_dir>/<feature>.json` for the given (module, index) pairs (default: all)."""
        out_dir = Path(out_dir)
        if features is None:
            features = [(n, i) for n in self.names
                        for i in range(self.state["dicts"][n]["count"].shape[0])]
        paths = []
        for name, i in tqdm(features, desc="feature files", leave=False):
            paths.append(atomic_write_json(out_dir / f"{feature_id(name, i)}.json",
                                           self.feature_file(name, i)))
        return paths


def load_pages(path: str | Path) -> FeaturePages:
    """Read a pages file written by `FeaturePages.save` (no code is executed on load)."""
    state = load_tensor_file(path, "feature pages file",
                             f"compute it with `python feature_pages.py --suite DIR --out {path}`")
    if not isinstance(state, dict) or "dicts" not in state:
        raise ValueError(f"{str(path)!r} is not a feature pages file (no 'dicts'); compute one "
                         f"with `python feature_pages.py --suite DIR --out {path}`")
    return FeaturePages(state)


@torch.no_grad()
def logit_effects(hf, W_dec_DF: Tensor, n: int, chunk: int = 1024) -> tuple[Tensor, ...]:
    """Top and bottom n tokens (and values) of W_U (gain_f * P d_j) for every feature j: gain_f
    and P those of the model's final norm (P the centring for LayerNorm, I for RMSNorm)."""
    arch = architecture(hf)
    W_U_VD = hf.get_submodule(arch.unembed).weight.float()
    gamma_D = arch.norm_gain(hf.get_submodule(arch.final_norm)).float()
    tops, topv, bots, botv = [], [], [], []
    for s in range(0, W_dec_DF.shape[1], chunk):
        Pd_FD = centre(W_dec_DF[:, s:s + chunk].float().T, arch.norm.centred)
        eff_VF = W_U_VD @ (gamma_D[:, None] * Pd_FD.T)
        t = eff_VF.topk(n, dim=0)
        b = eff_VF.topk(n, dim=0, largest=False)
        tops.append(t.indices.T), topv.append(t.values.T), bots.append(b.indices.T)
        botv.append(b.values.T)
    return (torch.cat(tops).cpu(), torch.cat(topv).cpu(), torch.cat(bots).cpu(),
            torch.cat(botv).cpu())


def downstream_index(suite: SCAESuite) -> dict[str, dict[str, Tensor]]:
    """For each dictionary, CSR lists of the transcoder features that list its features."""
    names = suite.names
    rows: dict[str, list] = {n: [] for n in names}
    for m in suite.transcoder_names if suite.has_connections else []:
        comp = suite.compiled(m)
        V_FC = suite.virtual_weights(m).detach().cpu()
        J_FC = comp.J_FC.cpu()
        for u, off in zip(comp.ups, comp.offsets):
            F_u = suite.dicts[u].dict_size
            i, c = ((J_FC >= off) & (J_FC < off + F_u)).nonzero(as_tuple=True)
            rows[u].append((J_FC[i, c] - off, torch.full_like(i, names.index(m)), i, V_FC[i, c]))
    out = {}
    for n in names:
        F = suite.dicts[n].dict_size
        if rows[n]:
            up, mod, idx, V = (torch.cat(t) for t in zip(*rows[n]))
        else:
            up = mod = idx = torch.zeros(0, dtype=torch.long)
            V = torch.zeros(0)
        order = up.argsort(stable=True)
        out[n] = {"ptr": csr_pointers(up, F), "module": mod[order], "index": idx[order],
                  "V": V[order].float()}
    return out


@torch.no_grad()
def compute_pages(model, suite: SCAESuite, cfg: PageConfig, contexts=None) -> FeaturePages:
    """The streaming pass (module docstring). `contexts`: an iterable of [ctx_len] LongTensors
    (default: cfg.data's validation split)."""
    t0 = time.perf_counter()
    hf = hf_model(model)
    suite.check_model(model)
    dev = torch.device(cfg.device)
    dt = next(suite.parameters()).dtype
    if contexts is None:
        contexts = contexts_from(cfg.data, model.tokenizer, cfg.ctx_len, split=cfg.split)
    names = suite.names
    trackers: dict[str, dict[str, TopTracker]] = {}
    stats: dict[str, dict[str, Tensor]] = {}
    V = {m: suite.virtual_weights(m) for m in suite.transcoder_names} if suite.has_connections \
        else {}
    for n in names:
        F = suite.dicts[n].dict_size
        tr = {"top_vanilla": TopTracker(F, cfg.n_top, cfg.window_before, cfg.window_after, dev),
              "sample": TopTracker(F, cfg.n_sample, cfg.window_before, cfg.window_after, dev)}
        if n in V:
            tr["top_pruned"] = TopTracker(F, cfg.n_top, cfg.window_before, cfg.window_after, dev)
        trackers[n] = tr
        stats[n] = {"count": torch.zeros(F, dtype=torch.long, device=dev),
                    "hist": torch.zeros(F, len(HIST_EDGES) - 1, dtype=torch.long, device=dev),
                    "act_min": torch.full((F,), math.inf, device=dev),
                    "act_max": torch.zeros(F, device=dev)}
        if n in V:
            C = V[n].shape[1]
            stats[n].update(sum_contrib=torch.zeros(F, C, dtype=torch.float64, device=dev),
                            count_both=torch.zeros(F, C, dtype=torch.long, device=dev),
                            sum_pre=torch.zeros(F, dtype=torch.float64, device=dev))
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    edges = HIST_EDGES.to(dev)
    seen, n_ctx = 0, 0
    bar = tqdm(total=cfg.n_tokens, desc="feature pages", unit="tok")
    model_dev = next(hf.parameters()).device
    for toks_sT in batched_contexts(contexts, cfg.batch_contexts):
        toks_sT = toks_sT.long()
        left = cfg.n_tokens - seen
        n_body = toks_sT.shape[1] - 1
        if left <= 0:
            break
        toks_sT = toks_sT[: max(1, math.ceil(left / n_body))]
        s = toks_sT.shape[0]
        acts = trace_activations(model, toks_sT.to(model_dev))
        flat = {k: v[:, 1:].reshape(s * n_body, *v.shape[2:]).to(device=dev, dtype=dt)
                for k, v in acts.items()}
        batch = ActivationBatch.from_trace(flat, suite.n_layers)
        vanilla = suite.vanilla_forward(batch)
        pruned = suite.pruned_forward(batch, vanilla) if V else {}
        ctx_s = torch.arange(n_ctx, n_ctx + s, device=dev)
        body_sT = toks_sT[:, 1:].to(dev)
        up = {n: (pruned[n] if n in pruned else vanilla[n]).feats for n in names}
        for n in names:
            F = suite.dicts[n].dict_size
            tr, st = trackers[n], stats[n]
            van_sTF = vanilla[n].feats.dense(F).float().view(s, n_body, F)
            tr["top_vanilla"].update(van_sTF, body_sT, ctx_s)
            main_sTF = van_sTF
            if n in pruned:
                main_sTF = pruned[n].feats.dense(F).float().view(s, n_body, F)
                tr["top_pruned"].update(main_sTF, body_sT, ctx_s)
            key_sF = torch.rand(s, F, generator=gen, device=dev)
            tr["sample"].update(main_sTF, body_sT, ctx_s, score_sF=key_sF)
            feats = up[n]
            on = feats.vals_BK > 0
            idx_P, val_P = feats.idx_BK[on], feats.vals_BK[on].float()
            st["count"] += torch.bincount(idx_P, minlength=F)
            bins_P = torch.bucketize(val_P, edges).clamp(1, len(edges) - 1) - 1
            st["hist"].view(-1).index_add_(0, idx_P * (len(edges) - 1) + bins_P,
                                           torch.ones_like(bins_P))
            st["act_max"].scatter_reduce_(0, idx_P, val_P, "amax")
            st["act_min"].scatter_reduce_(0, idx_P, val_P, "amin")
            if n in V:
                terms_BKC, _ = connection_terms(suite, n, up, batch.layernorm_scale[n],
                                                feats.idx_BK, V[n])
                st["sum_contrib"].index_add_(0, idx_P, terms_BKC[on].double())
                st["count_both"].index_add_(0, idx_P, (terms_BKC[on] != 0).long())
                st["sum_pre"].index_add_(0, idx_P, val_P.double())
        seen += s * n_body
        n_ctx += s
        bar.update(s * n_body)
    bar.close()
    if seen == 0:
        raise ValueError(f"the text source {cfg.data!r} ({cfg.split}) gave no context of "
                         f"{cfg.ctx_len} tokens; pass more text or a smaller ctx_len")
    tok = model.tokenizer
    vocab = [tok.decode([i]) for i in range(hf.config.vocab_size)]
    down = downstream_index(suite)
    dicts = {}
    for n in names:
        ae = suite.dicts[n]
        st = {k: v.cpu() for k, v in stats[n].items()}
        top, topv, bot, botv = logit_effects(hf, ae.decoder.weight.detach(), cfg.n_logits)
        d = {k: t.state() for k, t in trackers[n].items()}
        d.update(count=st["count"], hist=st["hist"], act_max=st["act_max"],
                 act_min=st["act_min"].nan_to_num(posinf=0.0), top_logits=top,
                 top_logit_values=topv, bottom_logits=bot, bottom_logit_values=botv,
                 downstream=down[n])
        if n in V:
            comp = suite.compiled(n)
            J = comp.J_FC.cpu()
            up_module = torch.full_like(J, -1)
            up_index = torch.full_like(J, -1)
            for u, off in zip(comp.ups, comp.offsets):
                hit = (J >= off) & (J < off + suite.dicts[u].dict_size)
                up_module[hit] = names.index(u)
                up_index[hit] = J[hit] - off
            d["conn"] = {"up_module": up_module, "up_index": up_index,
                         "V": V[n].detach().float().cpu(), "sum_contrib": st["sum_contrib"],
                         "count_both": st["count_both"], "sum_pre": st["sum_pre"]}
        dicts[n] = d
    seconds = time.perf_counter() - t0
    logger.info("feature pages of %d dictionaries over %d tokens (%d contexts) in %.1fs",
                len(names), seen, n_ctx, seconds)
    return FeaturePages({"names": names, "vocab": vocab, "n_tokens": seen, "n_contexts": n_ctx,
                         "config": asdict(cfg), "seconds": seconds, "dicts": dicts})


def main(argv=None) -> FeaturePages:
    from dictionary_learning.model import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True, help="suite folder or Hub id")
    p.add_argument("--out", required=True, help="pages file to write (torch.save)")
    p.add_argument("--model", help="model name or path (default: the suite's)")
    p.add_argument("--data", help="held-out text (default: the suite's training text)")
    p.add_argument("--tokens", type=int, default=2**16, help="held-out tokens")
    p.add_argument("--features-dir", dest="features_dir",
                   help="also write every feature's JSON file into this folder")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    suite = SCAESuite.from_pretrained(args.suite, device=args.device)
    model_name = args.model or suite.meta.get("model_name")
    if model_name is None:
        p.error("the suite does not record its model: pass --model")
    model = load_model(model_name, device=args.device)
    buffer_meta = suite.meta.get("buffer", {})
    cfg = PageConfig(data=args.data or buffer_meta.get("data", "embedded"), n_tokens=args.tokens,
                     ctx_len=int(buffer_meta.get("ctx_len", 128)), device=args.device)
    pages = compute_pages(model, suite, cfg)
    pages.save(args.out)
    if args.features_dir:
        pages.write_feature_files(args.features_dir)
    print(f"pages: {args.out} ({pages.state['n_tokens']} tokens, {pages.state['seconds']:.1f}s)")
    return pages


if __name__ == "__main__":
    main()
