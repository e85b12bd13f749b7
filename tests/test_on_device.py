"""The core computations on SCAE_TEST_DEVICE in SCAE_TEST_DTYPE (tests/device.py), each against a
float64 CPU reference of the same inputs and the same discrete choices (TopK indices,
candidates), so only the device's arithmetic differs.

Covers: the sparse kernels and their fallbacks, the pruned pass in both modes, its gradients, the
activation buffer, the connection search's importance, evaluation, and a short finetune.
On CPU (the default) it runs in fp32 in the normal suite; `benchmarks/gpu_check.sh` runs it with
SCAE_TEST_DEVICE=cuda in fp32 and bf16.
"""

import copy

import pytest
import torch

import dictionary_learning.sparse_ops as sparse_ops
import evaluate as ev
from buffer import AllActivationBuffer
from dictionary_learning.connections import upstream_names
from dictionary_learning.dictionary import Features
from find_top_connections import SparseActivations, collect_activations, importance, top_connections
from tests.device import RTOL, TEST_DEVICE, TEST_DTYPE, assert_close_to_reference
from tests.helpers import random_contexts, tiny_gpt2
from tests.scae_fixtures import random_batch, random_connections, random_suite
from trainers.scae import SCAETrainerConfig, TrainerSCAESuite

DEV, DT = TEST_DEVICE, TEST_DTYPE


def on_device(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEV, DT) if t.is_floating_point() else t.to(DEV)


def as_reference(t: torch.Tensor) -> torch.Tensor:
    """The device tensor's own values in float64 on CPU (so input rounding is not an error)."""
    return t.detach().to("cpu", torch.float64) if t.is_floating_point() else t.to("cpu")


# ------------------------------------------------------------------ kernels


@pytest.mark.parametrize("fallback", [False, True])
def test_kernels_and_gradients_match_plain_reference(fallback, monkeypatch):
    if fallback:  # the gather fallbacks used where torch's CSR / embedding_bag kernels are missing
        monkeypatch.setattr(sparse_ops, "kernel_available", lambda *a: False)
    monkeypatch.setattr(sparse_ops, "SAMPLED_MIN_RATIO", 0)  # the sampled base term, not dense
    g = torch.Generator().manual_seed(0)
    B, K, n_up, F, C, N, D = 33, 5, 40, 17, 6, 7, 8
    vals = on_device(torch.randn(B, K, generator=g, dtype=torch.float64))
    idx = torch.stack([torch.randperm(n_up, generator=g)[:K] for _ in range(B)]).to(DEV)
    J = torch.randint(0, n_up + 1, (F, C), generator=g).sort(1).values.to(DEV)
    cand = torch.stack([torch.randperm(F, generator=g)[:N] for _ in range(B)]).to(DEV)
    W = on_device(torch.randn(F, D, generator=g, dtype=torch.float64))
    dec = on_device(torch.randn(D, n_up, generator=g, dtype=torch.float64))
    params = [t.requires_grad_(True) for t in (vals, W, dec)]
    refs = [as_reference(t).requires_grad_(True) for t in params]

    def pipeline(vals, W, dec, kernels: bool):
        # virtual weights on the CSR pattern of J (padding excluded), then both connection kernels
        keep = J < n_up
        rows, slots = keep.nonzero(as_tuple=True)
        cols = J[rows, slots]
        if kernels:
            crow = torch.zeros(F + 1, dtype=torch.long, device=J.device)
            crow[1:] = keep.sum(1).cumsum(0)
            order = torch.argsort(cols, stable=True)
            tcrow = torch.zeros(n_up + 1, dtype=torch.long, device=J.device)
            tcrow[1:] = torch.bincount(cols, minlength=n_up).cumsum(0)
            V_P = sparse_ops.csr_virtual_weights(W, dec, crow, cols, tcrow, rows[order], order)
        else:
            V_P = sparse_ops.sampled_dot_plain(W, dec.T, rows, cols)
        V_FC = torch.zeros(F, C, dtype=V_P.dtype, device=V_P.device).index_put((rows, slots), V_P)
        if kernels:
            conn_BN = sparse_ops.connection_contrib_candidates(vals, idx, V_FC, J, cand, n_up)
            conn_BF = sparse_ops.connection_contrib_all(vals, idx, V_FC, J, n_up)
            base_BN = sparse_ops.dot_at_candidates(dec[:, :B].T, W, cand)
        else:
            conn_BN = sparse_ops.connection_contrib_plain(vals, idx, V_FC, J, cand, n_up)
            conn_BF = sparse_ops.connection_contrib_plain(
                vals, idx, V_FC, J, torch.arange(F).expand(B, F), n_up)
            base_BN = (dec[:, :B].T @ W.T).gather(1, cand)
        # the base term at the candidates, with x = the first B decoder columns (a gradient path)
        return V_P, conn_BN + base_BN, conn_BF

    got = pipeline(*params, kernels=True)
    want = pipeline(*refs, kernels=False)
    names = ["virtual weights", "candidates kernels", "all-features kernel"]
    for name, a, b in zip(names, got, want):
        assert a.dtype == DT, f"{name}: dtype {a.dtype}, want {DT}"
        assert_close_to_reference(a, b.detach(), name)
    g_out = torch.randn(B, N, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((got[1].float() * on_device(g_out).float()).sum(), params)
    ref_grads = torch.autograd.grad((want[1] * g_out).sum(), refs)
    for name, a, b in zip(["d vals", "d W_enc", "d decoder"], grads, ref_grads):
        assert_close_to_reference(a, b, f"candidates kernel gradient {name}")


def test_kernel_probe_accepts_this_device():
    """On CPU and CUDA the fast kernels must be the ones in use for fp32 (the fallback is
    slower)."""
    if DEV.type in ("cpu", "cuda"):
        assert sparse_ops.kernel_available("csr", DEV.type, torch.float32)
        assert sparse_ops.kernel_available("embedding_bag", DEV.type, torch.float32)


# ------------------------------------------------------------------ the pruned pass


def connected_suite(n_layers=3, d=16, F=40, k=4, C=10, seed=0):
    suite64 = random_suite(n_layers=n_layers, d=d, F=F, k=k, seed=seed)
    conns = random_connections(suite64, C=C, seed=seed)
    suite64.set_connections(conns)
    suite = copy.deepcopy(suite64).to(DEV, DT)
    # the reference uses the device suite's own (rounded) weights
    suite64 = copy.deepcopy(suite).to("cpu", torch.float64)
    return suite, suite64, conns


def dense_pruned_pre(suite64, batch64, conns, name: str, up_dense: dict) -> torch.Tensor:
    """docs/method.md §3 densely in float64:
    [(x0 + sum b_dec) Wc^T + sum_u f_u (M_u * Wc dec_u)^T] / sigma + b_enc, with M_u the
    connection mask and f_u the given dense upstream activations."""
    tc = suite64.dicts[name]
    W = tc.encoder.weight
    Wc = W - W.mean(1, keepdim=True)
    ups = upstream_names(name)
    pre = (batch64.initial + sum(suite64.dicts[u].b_dec for u in ups)) @ Wc.T
    for u, idx in conns[name].items():
        mask = torch.zeros(tc.dict_size, suite64.dicts[u].dict_size, dtype=torch.float64)
        r, c = (idx >= 0).nonzero(as_tuple=True)
        mask[r, idx[r, c]] = 1.0
        pre = pre + up_dense[u] @ (mask * (Wc @ suite64.dicts[u].decoder.weight)).T
    return pre / batch64.layernorm_scale[name][:, None] + tc.encoder.bias


def reference_pass(suite64, batch64, conns, vanilla, pruned):
    """fp64 forward with the device's discrete choices: vanilla TopK indices of the attention SAEs,
    and the transcoders' pruned TopK indices (and candidates). Differentiable in the weights."""
    up_dense, recon, pre = {}, {}, {}
    for layer in range(suite64.n_layers):
        a, m = f"attn_{layer}", f"mlp_{layer}"
        sae = suite64.dicts[a]
        idx_a = vanilla[a].feats.idx_BK.cpu()
        vals_a = sae.pre_acts(batch64.src[a]).gather(1, idx_a).relu()
        up_dense[a] = Features(vals_a, idx_a).dense(sae.dict_size)
        recon[a] = up_dense[a] @ sae.decoder.weight.T + sae.b_dec
        pre_BF = dense_pruned_pre(suite64, batch64, conns, m, up_dense)
        cand = pruned[m].cand_BN
        pre[m] = pre_BF if cand is None else pre_BF.gather(1, cand.cpu())
        idx_m = pruned[m].feats.idx_BK.cpu()
        tc = suite64.dicts[m]
        up_dense[m] = Features(pre_BF.gather(1, idx_m).relu(), idx_m).dense(tc.dict_size)
        recon[m] = up_dense[m] @ tc.decoder.weight.T + tc.b_dec
    return pre, recon


@pytest.mark.parametrize("mode", ["all", "candidates"])
def test_pruned_pass_matches_dense_reference(mode):
    suite, suite64, conns = connected_suite()
    batch = random_batch(n_layers=3, d=16, B=24).to(DEV, DT)
    batch64 = batch.to("cpu", torch.float64)
    gen = torch.Generator(device=DEV).manual_seed(0)
    with torch.no_grad():
        vanilla = suite.vanilla_forward(batch)
        pruned = suite.pruned_forward(batch, vanilla, mode=mode, n_threshold=6, n_random=3,
                                      generator=gen)
        pre, recon = reference_pass(suite64, batch64, conns, vanilla, pruned)
    for m in suite.transcoder_names:
        pre_m = pruned[m].pre_BF if mode == "all" else pruned[m].pre_BN
        assert pre_m.dtype == DT
        assert_close_to_reference(pre_m, pre[m], f"{m} pruned pre-activations ({mode})")
        assert_close_to_reference(
            pruned[m].recon_BD, recon[m], f"{m} pruned reconstruction ({mode})"
        )


def test_pruned_pass_gradients_match_dense_reference():
    suite, suite64, conns = connected_suite()
    batch = random_batch(n_layers=3, d=16, B=24).to(DEV, DT)
    batch64 = batch.to("cpu", torch.float64)
    gen = torch.Generator(device=DEV).manual_seed(0)
    vanilla = suite.vanilla_forward(batch)
    pruned = suite.pruned_forward(batch, vanilla, mode="candidates", n_threshold=6, n_random=3,
                                  generator=gen)
    g = torch.Generator().manual_seed(1)
    weights = {m: torch.randn(pruned[m].pre_BN.shape, generator=g, dtype=torch.float64)
               for m in suite.transcoder_names}

    def loss(pre, recon, tgt, device):
        """Every reconstruction's squared error plus a random linear function of the pruned
        pre-activations (the penalty and activation terms read them), summed in fp32 or fp64."""
        acc = torch.float64 if device == "cpu" else torch.float32
        err = sum((recon[n].to(acc) - tgt[n].to(acc)).pow(2).sum() for n in suite.names)
        return err + sum((pre[m].to(acc) * weights[m].to(device, acc)).sum() for m in pre)

    recon = {a: vanilla[a].recon_BD for a in vanilla if a.startswith("attn_")}
    recon.update({m: o.recon_BD for m, o in pruned.items()})
    loss({m: o.pre_BN for m, o in pruned.items()}, recon, batch.tgt, DEV).backward()
    pre64, recon64 = reference_pass(suite64, batch64, conns, vanilla, pruned)
    loss(pre64, recon64, batch64.tgt, "cpu").backward()
    for n in suite.names:
        params64 = suite64.dicts[n].parameters()
        for (pname, p), p64 in zip(suite.dicts[n].named_parameters(), params64):
            assert p.grad is not None and p.grad.dtype == DT, f"{n}.{pname}: no {DT} gradient"
            # gradients sum over tokens and features: allow twice the forward tolerance
            assert_close_to_reference(p.grad, p64.grad, f"gradient of {n}.{pname}", rtol=2 * RTOL)


# ------------------------------------------------------------------ buffer, search, evaluation


def sensible_suite(F=64, k=4, C=None):
    """A float32 suite for the tiny model whose encoders read their decoders (FVU of order 1)."""
    suite = random_suite(n_layers=2, d=32, F=F, k=k, dtype=torch.float32)
    with torch.no_grad():
        for ae in suite.dicts.values():
            ae.encoder.weight.copy_(ae.decoder.weight.T)
            ae.encoder.bias.zero_()
    if C is not None:
        suite.set_connections(random_connections(suite, C=C))
    return suite


def test_buffer_on_device_matches_cpu():
    model_cpu, _ = tiny_gpt2(n_layer=2, d_model=32, n_ctx=32)
    model_dev, _ = tiny_gpt2(n_layer=2, d_model=32, n_ctx=32, device=DEV)
    ctxs = random_contexts(24, 17, seed=2)
    kw = dict(n_tokens=200, out_batch_size=50, model_batch_size=8, seed=3)
    ref = AllActivationBuffer(model_cpu, iter(ctxs), **kw)
    dev = AllActivationBuffer(model_dev, iter(ctxs), device=DEV, dtype=DT, **kw)
    for _ in range(6):  # more than one fill
        b_ref, b_dev = next(ref), next(dev)
        assert b_dev.initial.device.type == DEV.type and b_dev.initial.dtype == DT
        assert_close_to_reference(b_dev.initial, b_ref.initial.double(), "buffer x0")
        for n in b_ref.src:
            assert_close_to_reference(b_dev.src[n], b_ref.src[n].double(), f"buffer src {n}")
            assert_close_to_reference(b_dev.tgt[n], b_ref.tgt[n].double(), f"buffer tgt {n}")
        for n in b_ref.layernorm_scale:
            assert_close_to_reference(b_dev.layernorm_scale[n], b_ref.layernorm_scale[n].double(),
                                      f"buffer sigma {n}")


def test_connection_importance_on_device_matches_reference():
    suite, suite64, _ = connected_suite(n_layers=2)
    batches = [random_batch(n_layers=2, d=16, B=64, seed=s).to(DEV, DT) for s in range(3)]
    acts = collect_activations(suite, batches, n_tokens=160)
    acts64 = SparseActivations(*({k: as_reference(v) for k, v in part.items()} for part in acts))
    for m in suite.transcoder_names:
        want = importance(suite64, acts64, m, method="dense")
        for method in ("dense", "coactive"):
            assert_close_to_reference(importance(suite, acts, m, method=method), want,
                                      f"{m} importance ({method} route)")
    conns = top_connections(suite, acts, C=8)
    assert set(conns) == set(suite.transcoder_names)


def test_evaluation_on_device_matches_cpu():
    model_cpu, _ = tiny_gpt2(n_layer=2, d_model=32, n_ctx=32)
    model_dev, _ = tiny_gpt2(n_layer=2, d_model=32, n_ctx=32, device=DEV)
    toks = torch.stack(random_contexts(6, 12, seed=3))
    suite = sensible_suite(F=48, C=8).to(DEV, DT)
    ref = ev.evaluate_suite(copy.deepcopy(suite).to("cpu", torch.float32), model_cpu, toks,
                            batch_size=4, progress=False)
    got = ev.evaluate_suite(suite, model_dev, toks, batch_size=4, device=DEV, dtype=DT,
                            progress=False)
    # bf16 flips near-ties in TopK, which moves these FVUs (of order 1e6 here: random dictionaries
    # on tiny attention outputs) by several percent; fp32 must agree closely
    tol = 1e-3 if DT == torch.float32 else 0.25
    assert got.modules.keys() == ref.modules.keys() and got.n_tokens == ref.n_tokens
    for n, r in ref.modules.items():
        for field in ("fvu_vanilla", "fvu_pruned", "l0", "l0_pruned", "agreement"):
            a, b = getattr(got.modules[n], field), getattr(r, field)
            assert abs(a - b) <= tol * max(1.0, abs(b)), f"{n}.{field}: {a} on {DEV}, {b} on CPU"
    # the model itself runs in fp32 on both: its CE agrees closely in every suite dtype
    assert got.ce.clean == pytest.approx(ref.ce.clean, rel=1e-4)
    for field in ("ablated", "vanilla", "pruned"):
        a, b = getattr(got.ce, field), getattr(ref.ce, field)
        assert abs(a - b) <= tol * max(1.0, abs(b)), f"CE {field}: {a} on {DEV}, {b} on CPU"


# ------------------------------------------------------------------ finetuning


def test_short_finetune_on_device_lowers_pruned_fvu():
    model, _ = tiny_gpt2(n_layer=2, d_model=32, n_ctx=32, device=DEV)
    buf = AllActivationBuffer(model, iter(random_contexts(400, 17)), n_tokens=2048,
                              out_batch_size=256, model_batch_size=32, device=DEV, dtype=DT)
    suite = sensible_suite().to(DEV, DT)
    suite.set_connections(top_connections(suite, collect_activations(suite, buf, 1024), C=8))
    cfg = SCAETrainerConfig(total_steps=30, kl_coeff=0.0, lr=3e-3, warmup_steps=2, n_threshold=8,
                            n_random=4, act_coeff=0.1, random_coeff=0.01)
    tr = TrainerSCAESuite(suite, cfg, device=DEV, dtype=DT)
    batches = [next(buf) for _ in range(6)]
    first = tr.update(0, batches[0])
    for step in range(1, 30):
        last = tr.update(step, batches[step % 6])
    for m in suite.transcoder_names:
        assert last[f"{m}/fvu_pruned"] < 0.85 * first[f"{m}/fvu_pruned"], (m, first, last)
    for ae in suite.dicts.values():
        for p in ae.parameters():
            assert p.device.type == DEV.type and p.dtype == DT and torch.isfinite(p).all()
