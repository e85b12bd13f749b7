"""The SCAE suite and its pruned forward pass (docs/method.md §3), and the finetuning trainer
(docs/method.md §5).

Reading order: `SCAESuite.vanilla_forward` encodes each dictionary's true input;
`SCAESuite.pruned_forward` rebuilds each transcoder's input from its connected upstream features
only, in layer order, with `_pruned_pre` holding the one definition of the pruned pre-activation
for both the candidates mode (training) and the all-features mode (evaluation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from dictionary_learning.connections import (
    CompiledConnections,
    Connections,
    compile_connections,
    to_exchange,
    validate_connections,
)
from dictionary_learning.dictionary import Features, TopKDictionary, topk_relu
from dictionary_learning.distributed import rank
from dictionary_learning.names import module_names, parse_module_name
from dictionary_learning.suite_io import load_suite, save_suite
from dictionary_learning.validate import check_candidates
from dictionary_learning.sparse_ops import (
    connection_contrib_all,
    connection_contrib_candidates,
    csr_virtual_weights,
)
from trainers.top_k import TopKSuiteTrainer, TopKTrainerConfig, auxk_loss, fvu, ratio_across_ranks

Mode = Literal["all", "candidates"]


class DictOutput(NamedTuple):
    """One dictionary's output in one pass."""

    feats: Features
    """Active features: values [B, K] and indices [B, K]."""
    recon_BD: Tensor
    """Reconstruction of the target."""
    pre_BN: Tensor | None
    """Pre-activations before ReLU/TopK: all features [B, F], or the candidates [B, N] when
    cand_BN is set; None where the training step no longer needs them."""
    cand_BN: Tensor | None = None
    """Candidate feature indices (candidates mode of the pruned pass), else None."""
    penalty: Tensor | None = None
    """Random-candidate penalty (candidates mode with n_random > 0), a scalar."""


class SuiteOutput(NamedTuple):
    vanilla: dict[str, DictOutput]
    pruned: dict[str, DictOutput]
    """Pruned outputs of the transcoders only (attention SAEs are leaves)."""


class SCAESuite(nn.Module):
    """An attention SAE and a transcoder per layer, plus the transcoders' upstream connections."""

    def __init__(self, dicts: dict[str, TopKDictionary], connections: Connections | None = None):
        super().__init__()
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
        if connections is not None:
            self.set_connections(connections)

    def check_fits(self, n_layers: int, d_model: int, what: str = "the model") -> None:
        """Raise if the suite was made for a model of another width or depth."""
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

    # ----------------------------------------------------------------- connections

    @property
    def dict_sizes(self) -> dict[str, int]:
        return {n: ae.dict_size for n, ae in self.dicts.items()}

    @property
    def transcoder_names(self) -> list[str]:
        return [n for n in self.names if n.startswith("mlp_")]

    @property
    def has_connections(self) -> bool:
        return bool(self._compiled)

    def set_connections(self, connections: Connections) -> None:
        """Validate and compile connections (exchange format). Every transcoder needs an entry."""
        validate_connections(connections, self.dict_sizes)
        missing = [m for m in self.transcoder_names if m not in connections]
        if missing:
            raise ValueError(
                f"connections have no entry for {missing}; give every transcoder an entry "
                f"(an empty dict means no connections)"
            )
        device = self.dicts[self.names[0]].encoder.weight.device
        self._compiled = {
            m: compile_connections(m, connections[m], self.dict_sizes).to(device)
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

    def vanilla_one(self, name: str, batch) -> DictOutput:
        """Dictionary `name` encodes its true input (attn_out, or mlp_in after the folded ln_2)."""
        ae = self.dicts[name]
        pre_BF = ae.pre_acts(batch.src[name])
        feats = topk_relu(pre_BF, ae.k)
        return DictOutput(feats, ae.decode(feats), pre_BF)

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
    ) -> dict[str, DictOutput]:
        """Transcoder outputs from connected upstream features only, in layer order.

        Upstream features are the vanilla ones for attention SAEs and the pruned ones for
        transcoders. mode="all" computes every feature (evaluation); mode="candidates" computes
        the vanilla top K, the next n_threshold and n_random random features (training), or the
        candidates already in `vanilla[m].cand_BN`.
        """
        if vanilla is None:
            vanilla = self.vanilla_forward(batch)
        up_feats: dict[str, Features] = {}
        out = {}
        for layer in range(self.n_layers):
            a, m = f"attn_{layer}", f"mlp_{layer}"
            up_feats[a] = vanilla[a].feats
            out[m] = self._pruned_transcoder(
                m, batch, vanilla[m], up_feats, mode, n_threshold, n_random, generator
            )
            up_feats[m] = out[m].feats
        return out

    def forward(self, batch, **pruned_kwargs) -> SuiteOutput:
        vanilla = self.vanilla_forward(batch)
        return SuiteOutput(vanilla, self.pruned_forward(batch, vanilla, **pruned_kwargs))

    def candidates(
        self, name: str, vanilla_pre_BF: Tensor, n_threshold: int, n_random: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """[B, K + n_threshold + n_random]: vanilla top K, the next n_threshold, then random
        others."""
        ae = self.dicts[name]
        n_top = ae.k + n_threshold
        check_candidates(name, ae.k, n_threshold, n_random, ae.dict_size)
        pre_BF = vanilla_pre_BF.detach()
        top_BT = pre_BF.topk(n_top, dim=1, sorted=True).indices
        if n_random == 0:
            return top_BT
        scores_BF = torch.rand(pre_BF.shape, generator=generator, device=pre_BF.device)
        scores_BF.scatter_(1, top_BT, -1.0)
        rand_BR = scores_BF.topk(n_random, dim=1, sorted=False).indices
        return torch.cat([top_BT, rand_BR], dim=1)

    def virtual_weights(self, name: str) -> Tensor:
        """V [F, C]: V[i, c] = (P w_i) . d_{J[i, c]}, the weight of transcoder `name`'s feature i on
        its c-th connection (zero at padding); one sampled product per upstream module."""
        comp = self.compiled(name)
        W_enc_FD = self.dicts[name].encoder.weight
        Wc_FD = W_enc_FD - W_enc_FD.mean(dim=1, keepdim=True)  # rows P w_i
        F, C = comp.J_FC.shape
        V_parts, pos_parts = [], []
        for j, u in enumerate(comp.ups):
            if comp.pos[j].numel() == 0:
                continue
            V_parts.append(csr_virtual_weights(
                Wc_FD, self.dicts[u].decoder.weight, comp.crow[j], comp.cols[j], comp.tcrow[j],
                comp.tcol[j], comp.tperm[j],
            ))
            pos_parts.append(comp.pos[j])
        V_flat = Wc_FD.new_zeros(F * C)
        if V_parts:
            V_flat = V_flat.index_put((torch.cat(pos_parts),), torch.cat(V_parts))
        return V_flat.view(F, C)

    def _pruned_pre(
        self,
        name: str,
        batch,
        up_feats: dict[str, Features],
        cand_BN: Tensor | None,
    ) -> Tensor:
        """The pruned pre-activations of transcoder `name` (docs/method.md §3), for candidates or
        all.

        pre_i = [w_i.P x0 + sum_u w_i.P b_dec_u + sum_{(u,j) in conn(i)} f_uj (w_i.P d_uj)] / sigma
                + b_enc_i
        """
        comp = self.compiled(name)
        ae = self.dicts[name]
        Wc_FD = ae.encoder.weight - ae.encoder.weight.mean(dim=1, keepdim=True)  # rows P w_i
        V_FC = self.virtual_weights(name)

        # Upstream features in the global index space, and the embedding + bias term.
        vals_BK = torch.cat([up_feats[u].vals_BK for u in comp.ups], dim=1)
        idx_BK = torch.cat(
            [up_feats[u].idx_BK + off for u, off in zip(comp.ups, comp.offsets, strict=True)],
            dim=1,
        )
        # (x0 + sum_u b_dec_u) @ Wc.T, split so that no [B, F] @ [F, D] product is needed for the
        # gradient of the biases (x0 is data).
        b_D = sum(self.dicts[u].b_dec for u in comp.ups)
        base_BF = batch.initial @ Wc_FD.T + Wc_FD @ b_D
        sigma_B1 = batch.layernorm_scale[name][:, None]

        if cand_BN is None:
            conn_BF = connection_contrib_all(vals_BK, idx_BK, V_FC, comp.J_FC, comp.n_up)
            return (base_BF + conn_BF) / sigma_B1 + ae.encoder.bias
        conn_BN = connection_contrib_candidates(
            vals_BK, idx_BK, V_FC, comp.J_FC, cand_BN, comp.n_up
        )
        return (base_BF.gather(1, cand_BN) + conn_BN) / sigma_B1 + ae.encoder.bias[cand_BN]

    def _pruned_transcoder(
        self, name, batch, vanilla_out: DictOutput, up_feats, mode, n_threshold, n_random,
        generator,
    ) -> DictOutput:
        ae = self.dicts[name]
        if mode == "all":
            pre_BF = self._pruned_pre(name, batch, up_feats, None)
            feats = topk_relu(pre_BF, ae.k)
            return DictOutput(feats, ae.decode(feats), pre_BF)
        if mode != "candidates":
            raise ValueError(f"mode must be 'all' or 'candidates', got {mode!r}")
        cand_BN = vanilla_out.cand_BN
        if cand_BN is None:
            cand_BN = self.candidates(name, vanilla_out.pre_BN, n_threshold, n_random, generator)
        pre_BN = self._pruned_pre(name, batch, up_feats, cand_BN)
        n_top = ae.k + n_threshold
        top = pre_BN[:, :n_top]
        sel_vals_BK, sel_BK = top.topk(ae.k, dim=1, sorted=False)
        feats = Features(sel_vals_BK.relu(), cand_BN.gather(1, sel_BK))
        penalty = None
        if n_random > 0:
            floor_B1 = top.min(dim=1, keepdim=True).values
            penalty = (pre_BN[:, n_top:] - floor_B1).relu().sum(1).mean()
        return DictOutput(feats, ae.decode(feats), pre_BN, cand_BN, penalty)

    # ----------------------------------------------------------------- files

    def save_pretrained(self, path: str | os.PathLike, meta: dict | None = None) -> None:
        """Save dictionaries, connections and `meta` (default: self.meta) as a suite folder."""
        conns = self.connections if self.has_connections else None
        meta = {k: v for k, v in (self.meta if meta is None else meta).items()
                if k not in ("format", "format_version", "dictionaries", "versions")}
        save_suite(path, dict(self.dicts.items()), meta, conns)

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike, device="cpu", dtype=torch.float32,
        connections: Connections | None = None,
    ) -> "SCAESuite":
        """Load a suite folder (ours, or the original SCAE fork's Hub layout), local or a Hub id."""
        files = load_suite(path_or_repo_id, device=device, dtype=dtype)
        suite = cls(files.dicts, connections if connections is not None else files.connections)
        suite.meta = dict(files.meta)
        return suite.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- finetuning


@dataclass
class SCAETrainerConfig(TopKTrainerConfig):
    """Hyperparameters of SCAE finetuning (docs/method.md §5); the TopK fields keep their
    meaning."""

    coeff: float = 1.0
    """Weight of each transcoder's pruned FVU."""
    loss: Literal["vanilla+pruned", "pruned"] = "vanilla+pruned"
    """'vanilla+pruned': sum_attn FVU_v + sum_mlp (FVU_v + coeff FVU_p); 'pruned': the transcoders'
    vanilla term is dropped (attention SAEs keep theirs)."""
    act_coeff: float = 0.0
    """Weight of the activation-difference term ||f_vanilla - f_pruned||^2 / ||f_vanilla||^2."""
    n_threshold: int = 32
    """Candidates after the vanilla top K, by vanilla pre-activation."""
    n_random: int = 0
    """Random other candidates per token, used only by the penalty (0: no penalty)."""
    random_coeff: float = 0.0
    """Weight of the random-candidate penalty sum relu(pre_random - min(pre_top)), averaged over
    tokens. Off by default: its raw scale (~10 at the start of finetuning) dwarfs the FVU terms."""
    warmup_steps: int = 50
    auxk_alpha: float = 1 / 32
    """AuxK on the vanilla pass, as in pretraining, to keep features alive."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in ("vanilla+pruned", "pruned"):
            raise ValueError(
                f"SCAETrainerConfig.loss={self.loss!r}: use 'vanilla+pruned' or 'pruned'"
            )
        counts = (self.n_threshold, self.n_random)
        coeffs = (self.coeff, self.random_coeff, self.act_coeff)
        if min(counts) < 0 or min(coeffs) < 0:
            raise ValueError(
                "SCAETrainerConfig: n_threshold, n_random and the coefficients must be >= 0"
            )


class TrainerSCAESuite(TopKSuiteTrainer):
    """Finetunes every dictionary of a connected suite through the pruned pass (docs/method.md §5).

    Implements the trainer protocol of `training.train`, like `TopKSuiteTrainer`, from which it
    takes the optimizer, the schedule, the unit-norm decoders and the dead-feature tracking.
    """

    def __init__(self, suite: SCAESuite, cfg: SCAETrainerConfig, device="cpu", dtype=torch.float32):
        if not suite.has_connections:
            raise ValueError(
                "TrainerSCAESuite needs a suite with connections: suite.set_connections(...) "
                "with the output of find_top_connections"
            )
        for m in suite.transcoder_names:
            ae = suite.dicts[m]
            check_candidates(m, ae.k, cfg.n_threshold, cfg.n_random, ae.dict_size)
        self.suite = suite.to(device=device, dtype=dtype)
        super().__init__(dict(suite.dicts.items()), cfg, device, dtype)
        self.initialized = True  # finetuning starts from trained dictionaries
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + rank())

    def losses(self, batch) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """Per-dictionary losses, scalar metrics, and the indices of fired (vanilla) features."""
        cfg = self.cfg
        batch = batch.to(self.device, self.dtype)
        self.suite._check_batch(batch)
        losses, metrics, fired, vanilla = {}, {}, {}, {}
        for n in self.names:
            # Vanilla pass one dictionary at a time: its [B, F] pre-activations serve AuxK and the
            # candidates, then only the candidates' [B, N] are kept (memory of the training step).
            d, van = self.dicts[n], self.suite.vanilla_one(n, batch)
            x, y = self.io(n, batch)
            aux = auxk_loss(d, van.pre_BN, y.float() - van.recon_BD.float(), self.dead_mask(n),
                            self.k_aux[n], relu=cfg.auxk_relu)
            if d.is_transcoder:
                cand_BN = self.suite.candidates(
                    n, van.pre_BN, cfg.n_threshold, cfg.n_random, self.generator
                )
                van = van._replace(pre_BN=van.pre_BN.gather(1, cand_BN), cand_BN=cand_BN)
            else:
                van = van._replace(pre_BN=None)
            vanilla[n] = van
            fvu_v = fvu(y, van.recon_BD, across_ranks=True)
            losses[n] = cfg.auxk_alpha * aux
            if not d.is_transcoder or cfg.loss == "vanilla+pruned":
                losses[n] = losses[n] + fvu_v
            metrics[f"{n}/fvu"], metrics[f"{n}/auxk"] = fvu_v.detach(), aux.detach()
            active_BK = van.feats.vals_BK > 0
            metrics[f"{n}/l0"] = active_BK.sum(1).float().mean()
            fired[n] = van.feats.idx_BK[active_BK]

        pruned = self.suite.pruned_forward(batch, vanilla, mode="candidates",
                                           n_threshold=cfg.n_threshold, n_random=cfg.n_random)
        for n, pr in pruned.items():
            _, y = self.io(n, batch)
            fvu_p = fvu(y, pr.recon_BD, across_ranks=True)
            losses[n] = losses[n] + cfg.coeff * fvu_p
            metrics[f"{n}/fvu_pruned"] = fvu_p.detach()
            if pr.penalty is not None:
                losses[n] = losses[n] + cfg.random_coeff * pr.penalty
                metrics[f"{n}/penalty"] = pr.penalty.detach()
            if cfg.act_coeff > 0:
                diff = self._activation_difference(self.dicts[n].k, vanilla[n], pr)
                losses[n] = losses[n] + cfg.act_coeff * diff
                metrics[f"{n}/act_diff"] = diff.detach()
        return losses, metrics, fired

    def _activation_difference(self, k: int, van: DictOutput, pr: DictOutput) -> Tensor:
        """||f_vanilla - f_pruned||^2 / ||f_vanilla||^2 over the top and threshold candidates (the
        denominator is a normaliser: no gradient flows through it)."""
        n_top = k + self.cfg.n_threshold
        f_van_BT = van.pre_BN[:, :n_top].relu()  # vanilla pre-activations at the candidates
        f_van_BT = torch.cat([f_van_BT[:, :k], torch.zeros_like(f_van_BT[:, k:])], dim=1)
        top_BT = pr.pre_BN[:, :n_top]
        vals_BK, sel_BK = top_BT.topk(k, dim=1)
        f_pr_BT = torch.zeros_like(top_BT).scatter(1, sel_BK, vals_BK.relu())
        return ratio_across_ranks(
            (f_van_BT - f_pr_BT).float().pow(2).sum(), f_van_BT.float().pow(2).sum()
        )

    def local_state_dict(self) -> dict:
        """This rank's own state (the candidate sampler), saved per rank in checkpoints."""
        return {"generator": self.generator.get_state()}

    def load_local_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
