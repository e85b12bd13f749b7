"""Circuits of an SCAE suite: the exact attribution graph of a prompt, its pruning, and its files.

    python circuits.py --suite DIR --prompt "To be, or not to be" [--target " that"] --out DIR
    python circuits.py --suite DIR --prompt ... --out DIR --pages PAGES.pt   # with feature pages

Phases, in the order `build_graph` runs them (docs/circuits.md has the derivations):

1. Run: one trace of the model on [BOS] + prompt, then the suite's vanilla and pruned passes over
   the prompt's positions (BOS excluded).
2. Nodes: embeddings, active attention-SAE features (vanilla pass), active transcoder features
   (pruned pass), one error node per dictionary and position (true output minus reconstruction),
   and the target logit plus the top logits at the last position.
3. Edges, with exact weights: into transcoder features from their connected upstream features and
   the embedding (the pruned pass's own terms, `SCAESuite.virtual_weights`); into attention features
   through the model's attention with its patterns (read from the model) and its norms' scales
   frozen; into logits through the final norm with its scale frozen. Constant terms (biases, b_dec,
   the BOS position) go on the node, so incoming edges plus constant equal each node's
   pre-activation (or logit, before any final soft-capping).
4. Influence and pruning as in circuit-tracer (`graph.py`): influence on the logits through the
   row-normalised |adjacency|, keep nodes with 80% and edges with 98% of it.

`write_graph_files` writes the graph in circuit-tracer's / Neuronpedia's attribution-graph JSON;
`viewer.write_viewer` writes the offline `index.html`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from dictionary_learning.arch import Architecture, architecture, centre
from dictionary_learning.batch import ActivationBatch, trace_activations
from dictionary_learning.dictionary import Features
from dictionary_learning.files import atomic_write_json
from dictionary_learning.model import hf_model, model_info
from dictionary_learning.names import is_transcoder, parse_module_name
from dictionary_learning.suite import DictOutput, SCAESuite

logger = logging.getLogger("circuits")

FEATURE, ERROR, EMBEDDING, LOGIT = 0, 1, 2, 3
"""Node kinds, in the order circuit-tracer stores them: features, errors, embeddings, logits."""


@dataclass
class GraphConfig:
    """Settings of one attribution graph."""

    n_logits: int = 5
    """Logit nodes at the last position: the target plus the most likely other tokens."""
    node_threshold: float = 0.8
    """Pruning keeps the nodes that carry this fraction of the influence (circuit-tracer's 0.8)."""
    edge_threshold: float = 0.98
    """Pruning keeps the edges that carry this fraction of the influence (circuit-tracer's 0.98)."""
    dtype: torch.dtype = torch.float64
    """dtype of the graph arithmetic (float64 makes the identities exact to ~1e-12)."""
    chunk_elements: int = 1 << 24
    """Elements per temporary [targets, heads, sources] block of the attention edges."""

    def __post_init__(self) -> None:
        for name in ("node_threshold", "edge_threshold"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"GraphConfig.{name}={v}: a fraction of influence in [0, 1]")
        if self.n_logits < 1:
            raise ValueError(f"GraphConfig.n_logits={self.n_logits}: at least the target logit")


class AttributionGraph(NamedTuple):
    """Nodes, the direct-effect matrix and the constants of one prompt's graph.

    Node order: active features (modules in execution order, then position, then index), error
    nodes (module, then position), embeddings (position), logits (target first).
    """

    prompt: str
    tokens: list[int]
    """Token ids of the prompt, BOS excluded (position p of the graph is token p + 1)."""
    token_strs: list[str]
    modules: list[str]
    """The suite's dictionaries in execution order; `module_X` indexes this list."""
    kind_X: Tensor
    """FEATURE, ERROR, EMBEDDING or LOGIT per node."""
    module_X: Tensor
    """Index into `modules` (features and errors), -1 otherwise."""
    pos_X: Tensor
    """Position in the prompt (BOS excluded)."""
    index_X: Tensor
    """Feature index (features), token id (embeddings, logits), -1 (errors)."""
    activation_X: Tensor
    """Pre-activation (features), logit before any final soft-capping (logits), norm of the vector
    written (errors, embeddings: display only)."""
    constant_X: Tensor
    """The node's constant term (biases, b_dec, the BOS position): value minus incoming edges."""
    adjacency_XX: Tensor
    """A[target, source] = direct effect of the source on the target (activation x weight)."""
    logit_probs: Tensor
    """Probability of each logit node's token at the last position (the model's, soft-capped)."""
    logit_strs: list[str]
    """The logit nodes' tokens as text."""
    info: dict
    """Timings, sizes and the largest identity error found while building."""

    @property
    def n_nodes(self) -> int:
        return int(self.kind_X.shape[0])

    @property
    def target(self) -> int:
        """Node index of the target logit."""
        return int((self.kind_X == LOGIT).nonzero()[0, 0])

    def node_label(self, n: int) -> str:
        kind, m, p, i = (int(t[n]) for t in (self.kind_X, self.module_X, self.pos_X, self.index_X))
        if kind == FEATURE:
            return f"{self.modules[m]}/{i}@{p}"
        if kind == ERROR:
            return f"{self.modules[m]}/error@{p}"
        if kind == EMBEDDING:
            return f"emb {self.token_strs[p]!r}@{p}"
        return f"logit {i}"


# =================================================================================== 1. run


class PromptRun(NamedTuple):
    """The one model run and the suite's passes over a prompt (positions 1.., BOS excluded)."""

    tokens_T: Tensor
    """[T] token ids, BOS first."""
    resid: dict[str, Tensor]
    """{"attn_<l>": input of block l, "final": input of the final norm}, each [T, D], graph
    dtype."""
    outputs: dict[str, Tensor]
    """Output of every module at every position, [T, D]: the model's for MLPs, the frozen
    attention's for attention (below)."""
    batch: ActivationBatch
    """The positions 1..T-1 as the suite's batch (B = T - 1 token rows), graph dtype."""
    vanilla: dict[str, DictOutput]
    pruned: dict[str, DictOutput]
    frozen: dict[str, "FrozenAttention"]
    """{"attn_<l>": block l's attention frozen on this run}."""
    arch: Architecture
    """The model's architecture description."""
    attn_recompute_error: float
    """Largest |model's attention output - the frozen attention's| over layers and positions."""


def tokenize_prompt(tokenizer, prompt: str | list[int]) -> Tensor:
    """[BOS] + the prompt's tokens (BOS = the eos token, as in training contexts). A list of token
    ids is taken as it is (text does not always survive a decode/encode round trip)."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        return torch.tensor([tokenizer.eos_token_id] + list(prompt), dtype=torch.long)
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("the prompt is empty; pass some text, e.g. --prompt 'To be, or not to be'")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the prompt {prompt!r} has no tokens")
    return torch.tensor([tokenizer.eos_token_id] + list(ids), dtype=torch.long)


@torch.no_grad()
def run_prompt(model, suite: SCAESuite, tokens_T: Tensor, dtype: torch.dtype) -> PromptRun:
    """One trace of the model and one run for its attention patterns, then the suite's vanilla
    and pruned passes, all in `dtype`.

    Each attention output is the frozen attention's (`FrozenAttention`) applied to the traced
    residual in `dtype`: the model's own output up to its rounding (RMSNorm families compute
    their norms in float32 even in a float64 model), so that every edge into an attention feature
    is exact in `dtype`; `attn_recompute_error` records the largest difference."""
    hf = hf_model(model)
    info = model_info(model)
    arch = architecture(hf)
    if tokens_T.shape[0] > info.n_ctx:
        raise ValueError(f"the prompt has {tokens_T.shape[0]} tokens with BOS; the model takes "
                         f"at most {info.n_ctx}: shorten it")
    suite.check_fits(info.n_layers, info.d_model, "the model", arch.suite_arch)
    device = next(suite.parameters()).device
    toks_1T = tokens_T[None].to(next(hf.parameters()).device)
    acts = trace_activations(model, toks_1T)
    acts = {k: v[0].to(device=device, dtype=dtype) for k, v in acts.items()}
    patterns = [p[0].to(device=device, dtype=dtype) for p in arch.attention_patterns(hf, toks_1T)]
    resid, outputs, frozen = {}, {}, {}
    recompute_error = 0.0
    r_TD = acts["initial"].clone()
    for layer in range(suite.n_layers):
        name = f"attn_{layer}"
        resid[name] = r_TD.clone()
        frozen[name] = frozen_attention(hf, arch, layer, r_TD, patterns[layer])
        out_TD = frozen[name](r_TD)
        recompute_error = max(recompute_error, float((acts[name] - out_TD).abs().max()))
        acts[name] = outputs[name] = out_TD
        outputs[f"mlp_{layer}"] = acts[f"mlp_out_{layer}"]
        r_TD = r_TD + outputs[name] + acts[f"mlp_out_{layer}"]
    resid["final"] = r_TD
    batch = ActivationBatch.from_trace({k: v[1:] for k, v in acts.items()}, suite.n_layers)
    vanilla = suite.vanilla_forward(batch)
    pruned = suite.pruned_forward(batch, vanilla)
    return PromptRun(tokens_T, resid, outputs, batch, vanilla, pruned, frozen, arch,
                     recompute_error)


# ======================================================================= frozen model pieces


class FrozenNorm(NamedTuple):
    """A norm with its scale frozen per position: gain * P x / sigma + beta, linear in x."""

    sigma_T: Tensor
    """The scale of each position, from the run."""
    gain_D: Tensor
    beta_D: Tensor
    """Zero where the norm has no bias (RMSNorm)."""
    centred: bool
    """P is the centring (LayerNorm), else the identity (RMSNorm)."""

    def __call__(self, x_TD: Tensor, pos: Tensor | slice = slice(None)) -> Tensor:
        return self.gain_D * centre(x_TD, self.centred) / self.sigma_T[pos, None] + self.beta_D

    def linear(self, x_QD: Tensor, pos_Q: Tensor) -> Tensor:
        """The norm's linear part gain * P x / sigma(pos) (no beta), for vectors written at
        positions pos_Q."""
        return self.gain_D * centre(x_QD, self.centred) / self.sigma_T[pos_Q, None]


def frozen_norm(arch: Architecture, norm, x_TD: Tensor) -> FrozenNorm:
    """`norm` (a module of the model) with its scales frozen at x_TD's rows, in x's dtype."""
    dt = x_TD.dtype
    beta = arch.norm_bias(norm)
    return FrozenNorm(arch.sigma(x_TD, arch.norm_eps(norm)), arch.norm_gain(norm).to(dt),
                      torch.zeros_like(x_TD[0]) if beta is None else beta.to(dt),
                      arch.norm.centred)


class FrozenAttention(NamedTuple):
    """One block's attention with its patterns and norm scales frozen from a run.

    attn_out(t) = post(sum_h sum_s A_h[t, s] (norm(r(s)) W_V[h] + b_V[h]) W_O[h] + b_O), with
    post = identity, or Gemma-2's post-attention norm with its scale frozen."""

    pattern_YTT: Tensor
    """Attention probabilities [head, query, key], BOS included (the model's own)."""
    norm: FrozenNorm
    """The attention's input norm (ln_1, input_layernorm)."""
    W_V_YDd: Tensor
    """Value weights per query head, x @ W_V[h] (key/value heads shared under GQA)."""
    b_V_Yd: Tensor
    W_O_YdD: Tensor
    b_O_D: Tensor
    post: FrozenNorm | None
    """The post-attention norm (Gemma-2), else None."""

    def pre_post(self, r_TD: Tensor) -> Tensor:
        """The output projection's output [T, D], before any post-norm."""
        v_YTd = torch.einsum("td,hde->hte", self.norm(r_TD), self.W_V_YDd) + self.b_V_Yd[:, None]
        z_YTd = self.pattern_YTT @ v_YTd
        return torch.einsum("hte,hed->td", z_YTd, self.W_O_YdD) + self.b_O_D

    def __call__(self, r_TD: Tensor) -> Tensor:
        """attn_out [T, D] of residual r through the frozen patterns and scales (dense)."""
        o_TD = self.pre_post(r_TD)
        return o_TD if self.post is None else self.post(o_TD)

    def read(self, w_PD: Tensor, pos_S: Tensor) -> tuple[Tensor, Tensor]:
        """(u, c) with w . attn_out(t) = u . o(t) + c at target positions pos_S (BOS included), o
        the output projection's output: through the frozen post-norm, u = P (gain * w) / sigma
        and c = w . beta; without one, u = w and c = 0."""
        if self.post is None:
            return w_PD, w_PD.new_zeros(w_PD.shape[0])
        u_PD = self.post.linear(w_PD, pos_S)
        return u_PD, w_PD @ self.post.beta_D


def frozen_attention(hf, arch: Architecture, layer: int, r_TD: Tensor, pattern_YTT: Tensor
                     ) -> FrozenAttention:
    """Block `layer`'s attention on residual r (BOS included) with the model's patterns and its
    norms' scales frozen, in r's dtype."""
    block = arch.block(hf, layer)
    dt = r_TD.dtype
    norm = frozen_norm(arch, block.get_submodule(arch.attn_norm), r_TD)
    W_V, b_V, W_O, b_O = arch.value_output(hf, layer, dt)
    fa = FrozenAttention(pattern_YTT, norm, W_V, b_V, W_O, b_O, None)
    if arch.attn_post_norm is None:
        return fa
    post = frozen_norm(arch, block.get_submodule(arch.attn_post_norm), fa.pre_post(r_TD))
    return fa._replace(post=post)


class FrozenUnembed(NamedTuple):
    """The final norm with its scale frozen, then the unembedding, at the last position."""

    norm: FrozenNorm
    W_U_VD: Tensor
    b_U_V: Tensor | None

    def __call__(self, r_D: Tensor) -> Tensor:
        logits_V = self.norm(r_D[None])[0] @ self.W_U_VD.T
        return logits_V if self.b_U_V is None else logits_V + self.b_U_V


def frozen_unembed(hf, arch: Architecture, r_D: Tensor) -> FrozenUnembed:
    """The model's final norm (scale frozen at r) and unembedding, in r's dtype. The logits are
    those before any final soft-capping (Gemma-2's), which is applied after."""
    dt = r_D.dtype
    head = hf.get_submodule(arch.unembed)
    bias = getattr(head, "bias", None)
    return FrozenUnembed(frozen_norm(arch, hf.get_submodule(arch.final_norm), r_D[None]),
                         head.weight.to(dt), None if bias is None else bias.to(dt))


# ================================================================================= 2-3. graph


def connection_terms(
    suite: SCAESuite, name: str, up_feats: dict[str, Features], sigma_B: Tensor, feat_BK: Tensor,
    V_FC: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-connection terms of the pruned pre-activation of transcoder `name`'s features feat_BK.

    Returns (terms_BKC, up_BKC): terms[b, k, c] = f_u(J[i, c]) * V[i, c] / sigma[b] for i =
    feat[b, k], and the global upstream index J[i, c] (padding = n_up). Their sum over c, plus
    (w_i.P x0 + sum_u w_i.P b_dec_u) / sigma + b_enc_i, is `SCAESuite._pruned_pre` (tests check it).
    """
    comp = suite.compiled(name)
    if not comp.ups:  # parallel blocks' mlp_0: no upstream dictionary
        empty = sigma_B.new_zeros(*feat_BK.shape, 0)
        return empty, empty.long()
    V_FC = suite.virtual_weights(name) if V_FC is None else V_FC
    vals_BA = torch.cat([up_feats[u].vals_BK for u in comp.ups], dim=1)
    idx_BA = torch.cat([up_feats[u].idx_BK + off for u, off in zip(comp.ups, comp.offsets)], dim=1)
    table_BG = vals_BA.new_zeros(vals_BA.shape[0], comp.n_up + 1).scatter(1, idx_BA, vals_BA)
    up_BKC = comp.J_FC[feat_BK]
    f_BKC = table_BG.gather(1, up_BKC.flatten(1)).view_as(up_BKC)
    return f_BKC * V_FC[feat_BK] / sigma_B[:, None, None], up_BKC


class _Nodes:
    """Builder of the node table; returns node indices as they are added."""

    def __init__(self):
        self.cols: dict[str, list] = {k: [] for k in ("kind", "module", "pos", "index", "act")}

    def add(self, kind: int, module: Tensor, pos: Tensor, index: Tensor, act: Tensor) -> Tensor:
        start = sum(len(c) for c in self.cols["kind"])
        n = pos.shape[0]
        self.cols["kind"].append(torch.full((n,), kind, dtype=torch.long))
        for key, t in (("module", module), ("pos", pos), ("index", index), ("act", act)):
            self.cols[key].append(t.detach().cpu())
        return torch.arange(start, start + n)

    def tensors(self) -> tuple[Tensor, ...]:
        cat = {k: torch.cat(v) for k, v in self.cols.items()}
        return cat["kind"], cat["module"], cat["pos"], cat["index"], cat["act"]


@torch.no_grad()
def build_graph(
    model, suite: SCAESuite, prompt: str | list[int], target: str | int | None = None,
    cfg: GraphConfig | None = None,
) -> AttributionGraph:
    """The attribution graph of `prompt`, text or token ids (module docstring, phases 1-3)."""
    cfg = cfg or GraphConfig()
    dt = cfg.dtype
    t0 = time.perf_counter()
    hf, tok = hf_model(model), model.tokenizer
    if not suite.has_connections:
        raise ValueError("the suite has no connections; load a suite folder with connections.pt "
                         "(find_top_connections.py) or call suite.set_connections(...)")
    suite_dt = next(suite.parameters()).dtype
    if suite_dt != dt:
        raise TypeError(f"the suite is {suite_dt} but GraphConfig.dtype is {dt}; load the suite "
                        f"in {dt} (SCAESuite.from_pretrained(..., dtype=...)) or change the config")
    tokens_T = tokenize_prompt(tok, prompt)
    run = run_prompt(model, suite, tokens_T, dt)
    B = tokens_T.shape[0] - 1
    names = suite.names
    device = run.batch.initial.device
    timing = {"run_s": time.perf_counter() - t0}

    # ---- nodes: features, errors, embeddings, logits
    nodes = _Nodes()
    feat_nodes: dict[str, Tensor] = {}  # per module: [B, F] node index of active features, -1 else
    feats: dict[str, Features] = {}
    for m_i, name in enumerate(names):
        out = run.pruned[name] if is_transcoder(name) else run.vanilla[name]
        feats[name] = out.feats
        vals_BK, idx_BK = out.feats
        # features in index order within a position: sort the active (value > 0) entries
        key_BK = torch.where(vals_BK > 0, idx_BK, suite.dicts[name].dict_size)
        order_BK = key_BK.argsort(dim=1)
        idx_BK, vals_BK = idx_BK.gather(1, order_BK), vals_BK.gather(1, order_BK)
        pos_P, slot_P = (vals_BK > 0).nonzero(as_tuple=True)
        idx_P = idx_BK[pos_P, slot_P]
        pre_P = out.pre_BF[pos_P, idx_P]  # the pre-activation: what the frozen model passes on
        ids = nodes.add(FEATURE, torch.full_like(pos_P, m_i), pos_P, idx_P, pre_P)
        table_BF = torch.full((B, suite.dicts[name].dict_size), -1, dtype=torch.long)
        table_BF[pos_P.cpu(), idx_P.cpu()] = ids
        feat_nodes[name] = table_BF
    n_feat = sum(len(c) for c in nodes.cols["kind"])
    err_BD = {n: run.outputs[n][1:] - (run.pruned[n] if is_transcoder(n) else run.vanilla[n])
              .recon_BD for n in names}
    err_nodes = {}
    for m_i, name in enumerate(names):
        pos = torch.arange(B)
        err_nodes[name] = nodes.add(ERROR, torch.full((B,), m_i), pos, torch.full((B,), -1),
                                    err_BD[name].norm(dim=-1))
    x0_BD = run.batch.initial
    emb_nodes = nodes.add(EMBEDDING, torch.full((B,), -1), torch.arange(B), tokens_T[1:],
                          x0_BD.norm(dim=-1))

    unembed = frozen_unembed(hf, run.arch, run.resid["final"][-1])
    logits_V = unembed(run.resid["final"][-1])
    # the logit nodes are the logits before any final soft-capping (linear in the residual); the
    # probabilities are the model's
    probs_V = run.arch.softcap(hf, logits_V).softmax(-1)
    target_id = _target_id(tok, target, logits_V)
    others = [int(v) for v in probs_V.argsort(descending=True) if int(v) != target_id]
    logit_ids = torch.tensor([target_id] + others[: cfg.n_logits - 1])
    logit_nodes = nodes.add(LOGIT, torch.full_like(logit_ids, -1),
                            torch.full_like(logit_ids, B - 1), logit_ids, logits_V[logit_ids])
    kind_X, module_X, pos_X, index_X, act_X = nodes.tensors()
    X = kind_X.shape[0]
    A_XX = torch.zeros(X, X, dtype=dt, device=device)
    const_X = torch.zeros(X, dtype=dt, device=device)

    # Every node that writes into the residual stream: its vector at its position.
    def writer_vectors(upto: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(node ids, positions, vectors [X, D], b_dec sum [D]) of modules names[:upto] + emb."""
        ids, pos, vecs = [emb_nodes], [torch.arange(B)], [x0_BD]
        b_D = torch.zeros_like(x0_BD[0])
        for name in names[:upto]:
            ae = suite.dicts[name]
            sel = feat_nodes[name] >= 0
            p_P, i_P = sel.nonzero(as_tuple=True)
            ids += [feat_nodes[name][p_P, i_P], err_nodes[name]]
            pos += [p_P, torch.arange(B)]
            a_P = act_X[feat_nodes[name][p_P, i_P]].to(device=device, dtype=dt)
            vecs += [a_P[:, None] * ae.decoder.weight.T[i_P.to(device)], err_BD[name]]
            b_D = b_D + ae.b_dec
        return torch.cat(ids), torch.cat(pos), torch.cat(vecs), b_D

    # ---- edges into transcoder features: the pruned pass's own terms
    for m_i, name in enumerate(names):
        if not is_transcoder(name):
            continue
        comp, ae = suite.compiled(name), suite.dicts[name]
        sel = feat_nodes[name] >= 0
        p_P, i_P = sel.nonzero(as_tuple=True)
        if p_P.numel() == 0:
            continue
        tgt = feat_nodes[name][p_P, i_P]
        sigma_P = run.batch.layernorm_scale[name][p_P.to(device)]
        up = {u: Features(feats[u].vals_BK[p_P.to(device)], feats[u].idx_BK[p_P.to(device)])
              for u in comp.ups}
        terms_P1C, up_P1C = connection_terms(suite, name, up, sigma_P, i_P.to(device)[:, None])
        terms_PC, up_PC = terms_P1C[:, 0], up_P1C[:, 0].cpu()
        # global upstream index -> node index at the same position
        src_PC = torch.full(up_PC.shape, -1, dtype=torch.long)
        for u, off in zip(comp.ups, comp.offsets):
            in_u = (up_PC >= off) & (up_PC < off + suite.dicts[u].dict_size)
            r, c = in_u.nonzero(as_tuple=True)
            src_PC[r, c] = feat_nodes[u][p_P[r], up_PC[r, c] - off]
        r, c = (src_PC >= 0).nonzero(as_tuple=True)
        A_XX[tgt[r], src_PC[r, c]] = terms_PC[r.to(device), c.to(device)]
        Wc_FD = suite.centre(ae.encoder.weight)
        x0_PD = x0_BD[p_P.to(device)]
        A_XX[tgt, emb_nodes[p_P]] = (x0_PD * Wc_FD[i_P.to(device)]).sum(-1) / sigma_P
        b_D = sum((suite.dicts[u].b_dec for u in comp.ups), torch.zeros_like(x0_BD[0]))
        const_X[tgt] = (Wc_FD[i_P.to(device)] @ b_D) / sigma_P + ae.encoder.bias[i_P.to(device)]

    # ---- edges into attention features: frozen patterns and norm scales, per head
    for m_i, name in enumerate(names):
        if is_transcoder(name):
            continue
        fa = run.frozen[name]
        ae = suite.dicts[name]
        sel = feat_nodes[name] >= 0
        p_P, i_P = sel.nonzero(as_tuple=True)
        if p_P.numel() == 0:
            continue
        tgt = feat_nodes[name][p_P, i_P]
        # what feature i reads of the output projection at its position (through a post-norm)
        w_PD, post_P = fa.read(ae.encoder.weight[i_P.to(device)], p_P.to(device) + 1)
        # read vectors r[s, h] = W_V[h] W_O[h] w_i: the direction head h reads for feature i
        R_PYD = torch.einsum("hed,sd->she", fa.W_O_YdD, w_PD)
        R_PYD = torch.einsum("hDe,she->shD", fa.W_V_YDd, R_PYD)
        src, spos, vec_XD, b_D = writer_vectors(m_i)
        q_pos = spos.to(device) + 1  # positions with BOS
        vn_XD = fa.norm.linear(vec_XD, q_pos)
        Y = fa.pattern_YTT.shape[0]
        step = max(1, cfg.chunk_elements // max(1, Y * vn_XD.shape[0]))
        for s in range(0, tgt.shape[0], step):
            sl = slice(s, s + step)
            pat_pYX = fa.pattern_YTT[:, p_P[sl].to(device) + 1][:, :, q_pos].permute(1, 0, 2)
            e_pX = (torch.einsum("shD,qD->shq", R_PYD[sl], vn_XD) * pat_pYX).sum(1)
            rows = tgt[sl][:, None].expand(-1, src.shape[0])
            A_XX[rows.reshape(-1), src.repeat(rows.shape[0])] = e_pX.reshape(-1)
        # constants: b_enc, the post-norm's beta, b_O, value biases and the input norm's beta
        # (times each pattern row's sum: 1 up to the rounding of a float32 softmax), the upstream
        # b_dec at every prompt position, and the whole residual at the BOS position
        pat_PYT = fa.pattern_YTT[:, p_P.to(device) + 1].permute(1, 0, 2)
        rows_PY = pat_PYT.sum(-1)
        c_P = ae.encoder.bias[i_P.to(device)] + post_P + w_PD @ fa.b_O_D
        c_P = c_P + torch.einsum("shD,D,sh->s", R_PYD, fa.norm.beta_D, rows_PY)
        c_P = c_P + torch.einsum("hed,sd,he,sh->s", fa.W_O_YdD, w_PD, fa.b_V_Yd, rows_PY)
        bn_TD = fa.norm.linear(b_D[None], slice(None))
        bos_D = fa.norm.linear(run.resid[name][0][None], slice(0, 1))[0]
        bn_TD = torch.cat([bos_D[None], bn_TD[1:]])
        c_P = c_P + torch.einsum("sht,shD,tD->s", pat_PYT, R_PYD, bn_TD)
        const_X[tgt] = c_P

    # ---- edges into logits: the final norm's scale frozen, from every node at the last position
    src, spos, vec_XD, b_D = writer_vectors(len(names))
    last = spos == B - 1
    src, vec_XD = src[last], vec_XD[last.to(device)]
    fn = unembed.norm
    u_VD = fn.gain_D * unembed.W_U_VD[logit_ids.to(device)]
    A_XX[logit_nodes[:, None], src[None, :]] = u_VD @ centre(vec_XD, fn.centred).T / fn.sigma_T[0]
    const_X[logit_nodes] = (u_VD @ centre(b_D, fn.centred)) / fn.sigma_T[0] + \
        unembed.W_U_VD[logit_ids.to(device)] @ fn.beta_D
    if unembed.b_U_V is not None:
        const_X[logit_nodes] += unembed.b_U_V[logit_ids.to(device)]
    timing["edges_s"] = time.perf_counter() - t0 - timing["run_s"]

    act_X = act_X.to(device=device, dtype=dt)
    has_in = kind_X.to(device) != ERROR
    has_in &= kind_X.to(device) != EMBEDDING
    identity_error = float((A_XX.sum(1) + const_X - act_X)[has_in].abs().max())
    info = {
        "n_nodes": X, "n_features": n_feat, "n_edges": int((A_XX != 0).sum()),
        "identity_error": identity_error, "attn_recompute_error": run.attn_recompute_error,
        "dtype": str(dt).removeprefix("torch."),
        "build_s": round(time.perf_counter() - t0, 3),
        **{k: round(v, 3) for k, v in timing.items()},
    }
    logger.info("graph of %d tokens: %d nodes (%d features), %d edges in %.2fs; max |edges + "
                "constant - value| = %.2e", B, X, n_feat, info["n_edges"], info["build_s"],
                identity_error)
    token_strs = [tok.decode([int(t)]) for t in tokens_T[1:]]
    if not isinstance(prompt, str):
        prompt = tok.decode(tokens_T[1:].tolist())
    return AttributionGraph(prompt, tokens_T[1:].tolist(), token_strs, list(names), kind_X,
                            module_X, pos_X, index_X, act_X, const_X, A_XX,
                            probs_V[logit_ids.to(device)],
                            [tok.decode([int(i)]) for i in logit_ids], info)


def _target_id(tokenizer, target: str | int | None, logits_V: Tensor) -> int:
    """The target token: the most likely one by default, a token id, or a one-token string."""
    if target is None:
        return int(logits_V.argmax())
    if isinstance(target, int):
        if not 0 <= target < logits_V.shape[0]:
            raise ValueError(f"target token id {target} is outside the vocabulary [0, "
                             f"{logits_V.shape[0]})")
        return target
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ValueError(f"the target {target!r} is {len(ids)} tokens {pieces}; pass a single "
                         f"token (mind the leading space, e.g. ' that')")
    return int(ids[0])


# ================================================================ 4. total effect and influence


def total_effect(graph: AttributionGraph, target: int | None = None) -> Tensor:
    """Signed total effect of every node on a logit node through the frozen linear graph, [X].

    With scales, patterns and TopK choices frozen and active features passing their
    pre-activation through, every value is linear in its sources; zeroing node n's value changes
    the target by -effect[n]. effect[n] = sum_m (effect[m] / value[m]) A[m, n] + A[target, n]
    (docs/circuits.md); the loop walks the DAG backwards, one layer of paths per step.
    """
    target = graph.target if target is None else target
    A = graph.adjacency_XX
    is_feat = (graph.kind_X == FEATURE).to(A.device)
    inv_act = torch.where(is_feat, 1.0 / graph.activation_X.where(is_feat, 1.0), 0.0)
    step_X = A[target].clone()
    effect_X = step_X.clone()
    for _ in range(graph.n_nodes + 1):
        step_X = (step_X * inv_act) @ A
        if not step_X.any():
            return effect_X
        effect_X += step_X
    raise RuntimeError("the graph has a cycle; effects did not converge")


def normalize_matrix(A_XX: Tensor) -> Tensor:
    """|A| with each row divided by its sum (circuit-tracer's normalize_matrix)."""
    absA = A_XX.abs()
    return absA / absA.sum(dim=1, keepdim=True).clamp(min=1e-10)


def compute_influence(A_XX: Tensor, logit_weights_X: Tensor, max_iter: int = 1000) -> Tensor:
    """w @ (A + A^2 + ...), the total influence of every node on the weighted logits."""
    current = logit_weights_X @ A_XX
    influence = current.clone()
    for _ in range(max_iter):
        current = current @ A_XX
        if not current.any():
            return influence
        influence += current
    raise RuntimeError(f"influence did not converge after {max_iter} iterations")


def logit_weights(graph: AttributionGraph) -> Tensor:
    """circuit-tracer's weights: each logit node weighted by its token's probability."""
    A = graph.adjacency_XX
    w_X = torch.zeros(graph.n_nodes, dtype=A.dtype, device=A.device)
    w_X[(graph.kind_X == LOGIT).to(w_X.device)] = graph.logit_probs.to(w_X.dtype)
    return w_X


def node_influence(graph: AttributionGraph) -> Tensor:
    return compute_influence(normalize_matrix(graph.adjacency_XX), logit_weights(graph))


def find_threshold(scores: Tensor, threshold: float) -> Tensor:
    """The score above which the kept scores carry `threshold` of the total."""
    sorted_scores = scores.sort(descending=True).values
    cumulative = sorted_scores.cumsum(0) / sorted_scores.sum()
    i = min(int(torch.searchsorted(cumulative, torch.tensor(threshold, dtype=cumulative.dtype,
                                                             device=cumulative.device))),
            len(cumulative) - 1)
    return sorted_scores[i]


class PruneResult(NamedTuple):
    node_mask: Tensor
    """[X] nodes kept."""
    edge_mask: Tensor
    """[X, X] edges kept (target, source)."""
    cumulative_scores: Tensor
    """[X] the cumulative influence fraction at each node's rank (circuit-tracer's `influence`)."""
    influence: Tensor
    """[X] each node's influence on the probability-weighted logits."""


def prune_graph(graph: AttributionGraph, node_threshold: float = 0.8,
                edge_threshold: float = 0.98) -> PruneResult:
    """Keep the nodes and edges that carry the given fractions of influence (circuit-tracer's
    prune_graph): embeddings and logits always stay; features and errors must keep an outgoing
    edge, and features an incoming one, until nothing changes."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}={v}: a fraction of influence in [0, 1]")
    A = graph.adjacency_XX
    w_X = logit_weights(graph)
    kind = graph.kind_X.to(A.device)
    always = (kind == EMBEDDING) | (kind == LOGIT)
    inner = (kind == FEATURE) | (kind == ERROR)
    feat = kind == FEATURE

    influence_X = compute_influence(normalize_matrix(A), w_X)
    node_mask = (influence_X >= find_threshold(influence_X, node_threshold)) | always

    pruned = A.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    norm = normalize_matrix(pruned)
    pruned_influence = compute_influence(norm, w_X) + w_X
    edge_scores = norm * pruned_influence[:, None]
    edge_mask = edge_scores >= find_threshold(edge_scores.flatten(), edge_threshold)

    old = node_mask.clone()
    node_mask &= ~inner | edge_mask.any(0)
    node_mask &= ~feat | edge_mask.any(1)
    while not torch.equal(node_mask, old):
        old = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask &= ~inner | edge_mask.any(0)
        node_mask &= ~feat | edge_mask.any(1)
    edge_mask[~node_mask] = False
    edge_mask[:, ~node_mask] = False

    sorted_scores, order = influence_X.sort(descending=True)
    cumulative = torch.zeros_like(influence_X)
    cumulative[order] = sorted_scores.cumsum(0) / sorted_scores.sum()
    return PruneResult(node_mask, edge_mask, cumulative, influence_X)


def graph_scores(graph: AttributionGraph) -> dict[str, float]:
    """circuit-tracer's replacement and completeness scores of the full graph.

    replacement: token-to-logit influence / (token + error influence); completeness: the
    influence-weighted fraction of node inputs that come from non-error nodes.
    """
    A = graph.adjacency_XX
    kind = graph.kind_X.to(A.device)
    w_X = logit_weights(graph)
    norm = normalize_matrix(A)
    infl = compute_influence(norm, w_X)
    token, error = float(infl[kind == EMBEDDING].sum()), float(infl[kind == ERROR].sum())
    non_error_frac = norm[:, kind != ERROR].sum(1)
    out_infl = infl + w_X
    completeness = float((non_error_frac * out_infl).sum() / out_infl.sum())
    return {"replacement_score": token / max(token + error, 1e-30),
            "completeness_score": completeness}


# ============================================================== frozen model, for ablations


@torch.no_grad()
def frozen_logits(model, suite: SCAESuite, graph: AttributionGraph, zero: int | None = None,
                  run: PromptRun | None = None) -> Tensor:
    """The logit nodes' values in the frozen replacement model, with node `zero` set to 0.

    An independent dense computation (not the graph's edges): x0, then per layer the frozen
    attention on the rebuilt residual, the attention SAE's pre-activations at its frozen active
    set, the transcoder's pruned pre-activations (`SCAESuite._pruned_pre`) at its active set,
    errors added as they were, and the logits through the frozen final norm. With zero=None it
    returns the model's own logits (before any final soft-capping).
    """
    dt = graph.adjacency_XX.dtype
    hf = hf_model(model)
    if run is None:
        run = run_prompt(model, suite, torch.tensor([model.tokenizer.eos_token_id] + graph.tokens),
                         dt)
    B = len(graph.tokens)
    kind, mod, pos, idx = graph.kind_X, graph.module_X, graph.pos_X, graph.index_X
    zkind = None if zero is None else int(kind[zero])

    def zeroed(m_i: int, kind_: int) -> Tensor:
        """Positions where module m_i's node of this kind is zeroed."""
        hit = torch.zeros(B, dtype=torch.bool)
        if zero is not None and zkind == kind_ and int(mod[zero]) == m_i:
            hit[int(pos[zero])] = True
        return hit

    x0_BD = run.batch.initial.clone()
    if zkind == EMBEDDING:
        x0_BD[int(pos[zero])] = 0
    r_BD = x0_BD.clone()
    bos_resid = {n: run.resid[n][0] for n in run.resid}
    up: dict[str, Features] = {}
    for m_i, name in enumerate(graph.modules):
        ae = suite.dicts[name]
        # the frozen active set, dense over features so that no index repeats
        active_BF = torch.zeros(B, ae.dict_size, dtype=torch.bool)
        sel = (kind == FEATURE) & (mod == m_i)
        active_BF[pos[sel], idx[sel]] = True
        if zkind == FEATURE and int(mod[zero]) == m_i:
            active_BF[int(pos[zero]), int(idx[zero])] = False
        if not is_transcoder(name):
            fa = run.frozen[name]
            full_TD = torch.cat([bos_resid[name][None], r_BD])
            pre_BF = ae.pre_acts(fa(full_TD)[1:])
        else:
            batch = run.batch._replace(initial=x0_BD)
            pre_BF = suite._pruned_pre(name, batch, up, None)
        vals_BF = pre_BF * active_BF.to(pre_BF.device)
        up[name] = Features(vals_BF, torch.arange(ae.dict_size, device=pre_BF.device)
                            .expand(B, -1).contiguous())
        err_BD = run.outputs[name][1:] - (run.pruned[name] if is_transcoder(name)
                                          else run.vanilla[name]).recon_BD
        err_BD = err_BD.masked_fill(zeroed(m_i, ERROR)[:, None].to(err_BD.device), 0.0)
        r_BD = r_BD + ae.decode(up[name]) + err_BD
    unembed = frozen_unembed(hf, run.arch, run.resid["final"][-1])
    logit_ids = graph.index_X[graph.kind_X == LOGIT].to(r_BD.device)
    return unembed(r_BD[-1])[logit_ids]


# ===================================================================== files (field format)


def cantor(x: int, y: int) -> int:
    """circuit-tracer's schema-1 feature id: the Cantor pairing of (layer row, index)."""
    return (x + y) * (x + y + 1) // 2 + y


def module_row(name: str) -> int:
    """The viewer row of a dictionary: attn_l -> 2l, mlp_l -> 2l + 1."""
    kind, layer = parse_module_name(name)
    return 2 * layer + (kind == "mlp")


def feature_id(name: str, index: int) -> int:
    return cantor(module_row(name), index)


def process_token(token: str) -> str:
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def graph_json(graph: AttributionGraph, pruned: PruneResult, slug: str, scan: str,
               node_threshold: float, edge_threshold: float, effect_X: Tensor | None = None
               ) -> dict:
    """The graph as circuit-tracer / Neuronpedia attribution-graph JSON (kept nodes and edges)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", slug):
        raise ValueError(f"slug {slug!r}: use letters, digits, '-', '_' or '.' (it is a file name)")
    n_rows = 2 * (len(graph.modules) // 2)
    keep = pruned.node_mask.cpu()
    cum, act = pruned.cumulative_scores.cpu().tolist(), graph.activation_X.cpu().tolist()
    infl = pruned.influence.cpu().tolist()
    effect = None if effect_X is None else effect_X.cpu().tolist()
    probs = graph.logit_probs.cpu().tolist()
    ids: dict[int, str] = {}
    nodes = []
    logit_rank = 0
    for n in keep.nonzero()[:, 0].tolist():
        kind, m, p, i = (int(t[n]) for t in (graph.kind_X, graph.module_X, graph.pos_X,
                                             graph.index_X))
        node = {"ctx_idx": p, "influence": cum[n], "activation": act[n],
                "token_prob": 0.0, "is_target_logit": False, "reverse_ctx_idx": 0, "run_idx": 0,
                "clerp": "", "influence_raw": infl[n]}
        if effect is not None:
            node["total_effect"] = effect[n]
        if kind == FEATURE:
            name = graph.modules[m]
            row = module_row(name)
            node.update(node_id=f"{row}_{i}_{p}", feature=feature_id(name, i), layer=str(row),
                        feature_type="cross layer transcoder", jsNodeId=f"{row}_{i}-0",
                        clerp=f"{name}/{i}", module=name, index=i)
        elif kind == ERROR:
            name = graph.modules[m]
            row = module_row(name)
            node.update(node_id=f"err_{row}_{p}", feature=-1, layer=str(row),
                        feature_type=f"{name.split('_')[0]} reconstruction error",
                        jsNodeId=f"err_{row}_{p}-0", clerp=f"Err: {name}", module=name)
        elif kind == EMBEDDING:
            node.update(node_id=f"E_{i}_{p}", feature=p, layer="E", feature_type="embedding",
                        jsNodeId=f"E_{i}-{p}")
        else:
            layer = str(n_rows + 1)
            prob = probs[logit_rank]
            tok = process_token(graph.logit_strs[logit_rank])
            node.update(node_id=f"{layer}_{i}_{p}", feature=i, layer=layer, feature_type="logit",
                        jsNodeId=f"L_{i}-{p}", token_prob=prob, is_target_logit=logit_rank == 0,
                        clerp=f'Output "{tok}" (p={prob:.3f})')
            logit_rank += 1
        ids[n] = node["node_id"]
        nodes.append(node)
    em = pruned.edge_mask.cpu()
    tgt, src = em.nonzero(as_tuple=True)
    w = graph.adjacency_XX.cpu()[tgt, src].tolist()
    links = [{"source": ids[s], "target": ids[t], "weight": wt}
             for t, s, wt in zip(tgt.tolist(), src.tolist(), w) if s in ids and t in ids]
    metadata = {
        "slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens":
        [process_token(t) for t in graph.token_strs], "prompt": graph.prompt,
        "node_threshold": node_threshold, "schema_version": 1,
        "info": {"creator_name": "scae circuits.py", "source_urls": [],
                 "dictionaries": graph.modules, "rows": {n: module_row(n) for n in graph.modules},
                 **graph.info},
        "pruning_settings": {"node_threshold": node_threshold, "edge_threshold": edge_threshold},
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
               "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


def add_graph_metadata(metadata: dict, out_dir: Path) -> None:
    """Add (or replace, by slug) a graph's metadata in out_dir/graph-metadata.json."""
    path = out_dir / "graph-metadata.json"
    index = json.loads(path.read_text()) if path.is_file() else {"graphs": []}
    index["graphs"] = [g for g in index["graphs"] if g["slug"] != metadata["slug"]] + [metadata]
    atomic_write_json(path, index)


class GraphFiles(NamedTuple):
    graph_path: Path
    """DIR/<slug>.json"""
    data: dict
    """The graph JSON as written."""
    feature_paths: list[Path]
    """Feature files written for the graph's feature nodes."""


def write_graph_files(graph: AttributionGraph, out_dir: str | Path, slug: str,
                      cfg: GraphConfig | None = None, pages=None, scan_name: str = "scae"
                      ) -> GraphFiles:
    """Prune `graph`, write DIR/<slug>.json and DIR/graph-metadata.json, and (with `pages`, a
    `feature_pages.FeaturePages`) DIR/features/<scan_name>/<feature>.json for every feature node.

    The scan is "./data/features/<scan_name>": `circuit-tracer start-server --graph_file_dir DIR`
    serves /data/* from DIR, and the viewer fetches `${scan}/${feature}.json`.
    """
    cfg = cfg or GraphConfig()
    out_dir = Path(out_dir)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", scan_name):
        raise ValueError(f"scan_name {scan_name!r}: use letters, digits, '-', '_' or '.'")
    pruned = prune_graph(graph, cfg.node_threshold, cfg.edge_threshold)
    effect_X = total_effect(graph)
    data = graph_json(graph, pruned, slug, f"./data/features/{scan_name}", cfg.node_threshold,
                      cfg.edge_threshold, effect_X)
    kept = pruned.node_mask
    data["metadata"]["info"].update(
        n_nodes_pruned=int(kept.sum()), n_edges_pruned=len(data["links"]),
        influence_retained=float(pruned.influence[kept].sum() / pruned.influence.sum()),
        **graph_scores(graph))
    feature_paths = []
    if pages is not None:
        for node in data["nodes"]:
            if node["feature_type"] != "cross layer transcoder":
                continue
            path = out_dir / "features" / scan_name / f"{node['feature']}.json"
            if not path.is_file():
                atomic_write_json(path, pages.feature_file(node["module"], node["index"]))
            feature_paths.append(path)
    path = out_dir / f"{slug}.json"
    atomic_write_json(path, data)
    add_graph_metadata(data["metadata"], out_dir)
    return GraphFiles(path, data, feature_paths)


def slugify(prompt: str, i: int) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-").lower()[:40].strip("-")
    return f"{i:02d}-{words or 'prompt'}"


def write_circuits(model, suite: SCAESuite, prompts: list[str | list[int]], out_dir: str | Path,
                   targets: list | None = None, cfg: GraphConfig | None = None, pages=None
                   ) -> Path:
    """Graphs of several prompts in the field's format, plus the offline viewer DIR/index.html."""
    from viewer import write_viewer

    cfg = cfg or GraphConfig()
    out_dir = Path(out_dir)
    targets = targets or [None] * len(prompts)
    if len(targets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets; give one each")
    graphs = []
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        graph = build_graph(model, suite, prompt, target, cfg)
        files = write_graph_files(graph, out_dir, slugify(graph.prompt, i), cfg, pages)
        graphs.append(files.data)
        logger.info("wrote %s: %d of %d nodes kept, %d edges, influence retained %.3f",
                    files.graph_path, files.data["metadata"]["info"]["n_nodes_pruned"],
                    graph.n_nodes, len(files.data["links"]),
                    files.data["metadata"]["info"]["influence_retained"])
    return write_viewer(out_dir, graphs, pages)


def main(argv=None) -> Path:
    from dictionary_learning.model import load_model
    from feature_pages import PageConfig, compute_pages, load_pages

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True, help="suite folder (with connections.pt) or Hub id")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text (repeat for several graphs)")
    p.add_argument("--target", action="append", help="target token per prompt (default: top-1)")
    p.add_argument("--out", required=True, help="folder for the graph files and index.html")
    p.add_argument("--model", help="model name or path (default: the suite's)")
    p.add_argument("--pages", help="feature pages file (feature_pages.py); default: compute them")
    p.add_argument("--page-tokens", type=int, default=2**14, dest="page_tokens",
                   help="held-out tokens for the feature pages when --pages is not given")
    p.add_argument("--data", help="held-out text for the pages (default: the suite's)")
    p.add_argument("--n-logits", type=int, default=5, dest="n_logits")
    p.add_argument("--node-threshold", type=float, default=0.8, dest="node_threshold")
    p.add_argument("--edge-threshold", type=float, default=0.98, dest="edge_threshold")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.target and len(args.target) != len(args.prompt):
        p.error(f"{len(args.prompt)} --prompt but {len(args.target)} --target; give one each")
    cfg = GraphConfig(n_logits=args.n_logits, node_threshold=args.node_threshold,
                      edge_threshold=args.edge_threshold)
    suite = SCAESuite.from_pretrained(args.suite, device=args.device, dtype=cfg.dtype)
    model_name = args.model or suite.meta.get("model_name")
    if model_name is None:
        p.error("the suite does not record its model: pass --model")
    model = load_model(model_name, device=args.device)
    if args.pages:
        pages = load_pages(args.pages)
    else:
        buffer_meta = suite.meta.get("buffer", {})
        pages = compute_pages(model, suite, PageConfig(
            data=args.data or buffer_meta.get("data", "embedded"), n_tokens=args.page_tokens,
            ctx_len=int(buffer_meta.get("ctx_len", 128)), device=args.device))
    hf_model(model).to(cfg.dtype)  # the graph's one run, in the graph's dtype
    index = write_circuits(model, suite, args.prompt, args.out, args.target, cfg, pages)
    print(f"viewer: {index.resolve()}")
    return index


if __name__ == "__main__":
    main()
