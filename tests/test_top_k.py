import math

import pytest
import torch

from dictionary_learning.batch import ActivationBatch
from dictionary_learning.dictionary import AutoEncoderTopK, TopKTranscoder
from dictionary_learning.errors import NonFiniteLossError
from trainers.top_k import (
    TopKSuiteTrainer,
    TopKTrainerConfig,
    auto_lr,
    auxk_loss,
    geometric_median,
    lr_schedule,
)




class SparseWorld:
    """Ground-truth sparse features: attn_out = A f, mlp_out = M mlp_in, with sparse f."""

    def __init__(self, d_model=16, n_true=48, n_active=3, n_layers=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.d, self.n_true, self.n_active, self.n_layers = d_model, n_true, n_active, n_layers
        self.atoms = [torch.randn(n_true, d_model, generator=g) for _ in range(2 * n_layers)]
        self.offset = torch.randn(d_model, generator=g) * 2
        self.mix = torch.randn(d_model, d_model, generator=g) / d_model**0.5

    def batch(self, B: int, g: torch.Generator) -> ActivationBatch:
        src, tgt, scale = {}, {}, {}
        for l in range(self.n_layers):
            for j, kind in enumerate(("attn", "mlp")):
                idx = torch.rand(B, self.n_true, generator=g).argsort(1)[:, : self.n_active]
                coef = torch.rand(B, self.n_active, generator=g) + 0.5
                f = torch.zeros(B, self.n_true).scatter(1, idx, coef)
                name = f"{kind}_{l}"
                if kind == "attn":
                    src[name] = tgt[name] = f @ self.atoms[2 * l] + self.offset
                else:  # mlp_in: sparse in atoms[2l + 1]; mlp_out: a linear image of it
                    src[name] = f @ self.atoms[2 * l + 1]
                    tgt[name] = src[name] @ self.mix + self.offset
                    scale[name] = torch.ones(B)
        return ActivationBatch(torch.zeros(B, self.d), src, tgt, scale)


class FakeBuffer:
    """Deterministic iterator of synthetic batches with exact state_dict resume."""

    def __init__(self, world: SparseWorld, batch_size=64, seed=0, n_batches=None):
        self.world, self.B, self.n_batches = world, batch_size, n_batches
        self.g = torch.Generator().manual_seed(seed)
        self.served = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.n_batches is not None and self.served >= self.n_batches:
            raise StopIteration
        self.served += 1
        return self.world.batch(self.B, self.g)

    def state_dict(self):
        return {"g": self.g.get_state(), "served": self.served}

    def load_state_dict(self, s):
        self.g.set_state(s["g"])
        self.served = s["served"]


def make(F=64, k=4, D=16, n_layers=1, **cfg):
    torch.manual_seed(0)
    dicts = {}
    for l in range(n_layers):
        dicts[f"attn_{l}"] = AutoEncoderTopK(D, F, k)
        dicts[f"mlp_{l}"] = TopKTranscoder(D, D, F, k)
    cfg.setdefault("total_steps", 100)
    cfg.setdefault("warmup_steps", 5)
    return TopKSuiteTrainer(dicts, TopKTrainerConfig(**cfg))


def test_lr_formula_and_schedule():
    assert auto_lr(2**14) == pytest.approx(2e-4)
    assert auto_lr(2**12) == pytest.approx(4e-4)
    torch.manual_seed(0)
    tr = TopKSuiteTrainer(
        {"attn_0": AutoEncoderTopK(8, 256, 2), "mlp_0": TopKTranscoder(8, 8, 1024, 2)},
        TopKTrainerConfig(total_steps=10, warmup_steps=0),
    )
    lrs = {g["name"]: g["lr"] for g in tr.optimizer.param_groups}
    assert lrs["attn_0"] == pytest.approx(2e-4 * 8) and lrs["mlp_0"] == pytest.approx(2e-4 * 4)
    f = lr_schedule(100, 10, 0.8)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(50) == 1.0
    assert f(90) == pytest.approx(0.5) and f(100) == 0.0


def test_geometric_median_and_bdec_init():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(500, 4, generator=g)
    pts[:50] += 100.0  # outliers pull the mean, not the median
    gm = geometric_median(pts)
    # optimality: the sum of unit vectors towards the points vanishes
    u = (pts.double() - gm.double())
    assert (u / u.norm(dim=1, keepdim=True)).sum(0).norm() < 1e-2
    assert gm.norm() < 3 and pts.mean(0).norm() > 10
    tr = make()
    batch = ActivationBatch(torch.zeros(500, 4), {"attn_0": pts, "mlp_0": pts * 2},
                            {"attn_0": pts, "mlp_0": pts + 1}, {"mlp_0": torch.ones(500)})
    tr = TopKSuiteTrainer({"attn_0": AutoEncoderTopK(4, 8, 2), "mlp_0": TopKTranscoder(4, 4, 8, 2)},
                          TopKTrainerConfig(total_steps=10))
    tr.init_from_batch(batch)
    torch.testing.assert_close(tr.dicts["attn_0"].b_dec.data, gm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tr.dicts["mlp_0"].b_dec.data, (pts + 1).mean(0))


def test_auxk_uses_pre_topk_and_reaches_dead_rows():
    torch.manual_seed(0)
    tr = make(F=64, k=2, auxk_alpha=1.0)
    world = SparseWorld(n_layers=1)
    batch = world.batch(32, torch.Generator().manual_seed(1))
    tr.init_from_batch(batch)
    d = tr.dicts["attn_0"]
    x = batch.src["attn_0"]
    active = torch.zeros(64, dtype=torch.bool)
    active[d.encode(x).idx_BK.flatten()] = True
    dead = ~active  # dead features are never in the TopK: post-TopK acts are all zero
    assert dead.sum() > 10
    recon = d(x)
    loss = auxk_loss(d, x, x - recon, dead, k_aux=8)
    assert loss > 0
    d.zero_grad()
    loss.backward()
    row_grad = d.encoder.weight.grad.norm(dim=1)
    assert (row_grad[dead] > 0).any()
    assert (row_grad[active] == 0).all()
    assert auxk_loss(d, x, x - recon, torch.zeros(64, dtype=torch.bool), 8) == 0


def test_auxk_sign():
    """The aux reconstruction must approximate +e: an exact match gives zero loss."""
    d = AutoEncoderTopK(4, 8, 1)
    a = torch.linspace(0.5, 3, 10)
    # pre-activations -1 everywhere but feature 3, whose pre-activation is a
    x = torch.zeros(10, 4)
    x[:, 0] = a
    with torch.no_grad():
        d.encoder.weight.zero_()
        d.encoder.weight[3, 0] = 1.0
        d.encoder.bias.fill_(-1.0)
        d.encoder.bias[3] = 0.0
    e = a[:, None] * d.decoder.weight[:, 3].detach()
    dead = torch.ones(8, dtype=torch.bool)
    assert auxk_loss(d, x, e, dead, 1).item() < 1e-10
    assert auxk_loss(d, x, -e, dead, 1).item() > 1.0


def test_decoder_unit_norm_and_parallel_grad_removed(monkeypatch):
    tr = make()
    calls = []
    for d in tr.dicts.values():
        orig = d.remove_parallel_decoder_grad
        monkeypatch.setattr(d, "remove_parallel_decoder_grad",
                            lambda orig=orig: (calls.append(1), orig())[1])
    world, g = SparseWorld(), torch.Generator().manual_seed(0)
    for s in range(3):
        tr.update(s, world.batch(64, g))
    assert len(calls) == 6
    for d in tr.dicts.values():
        torch.testing.assert_close(d.decoder.weight.norm(dim=0), torch.ones(64))
    d = AutoEncoderTopK(8, 16, 2)
    d.normalize_decoder()
    (d(torch.randn(32, 8)) ** 2).sum().backward()
    d.remove_parallel_decoder_grad()
    par = (d.decoder.weight.grad * d.decoder.weight).sum(0)
    assert par.abs().max() < 1e-5


def test_fvu_falls_and_dead_tracking():
    tr = make(F=96, k=3, total_steps=150, warmup_steps=10, lr=3e-3, dead_tokens=64 * 20)
    world, g = SparseWorld(n_true=48, n_active=3), torch.Generator().manual_seed(0)
    hist = [tr.update(s, world.batch(128, g)) for s in range(150)]
    for n in ("attn_0", "mlp_0"):
        first = sum(h[f"{n}/fvu"] for h in hist[:5]) / 5
        last = sum(h[f"{n}/fvu"] for h in hist[-5:]) / 5
        assert last < 0.5 * first, (n, first, last)
        assert 0 < hist[-1][f"{n}/l0"] <= 3
    assert {"loss", "lr", "attn_0/dead_frac", "mlp_0/auxk"} <= set(hist[-1])
    assert math.isfinite(hist[-1]["loss"])


def test_nan_raises_naming_dict_and_step():
    tr = make()
    world, g = SparseWorld(), torch.Generator().manual_seed(0)
    tr.update(0, world.batch(32, g))
    before = {k: v.clone() for k, v in tr.dicts["mlp_0"].state_dict().items()}
    b = world.batch(32, g)
    b.tgt["mlp_0"][3, 2] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"'mlp_0'.*step 7"):
        tr.update(7, b)
    for k, v in tr.dicts["mlp_0"].state_dict().items():
        assert torch.equal(v, before[k])


def test_bad_inputs():
    tr = make()
    world, g = SparseWorld(d_model=12), torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="attn_0.*expects input"):
        tr.update(0, world.batch(8, g))
    b = SparseWorld(n_layers=1).batch(8, g)
    del b.src["mlp_0"]
    with pytest.raises(KeyError, match="mlp_0"):
        make().update(0, b)
    with pytest.raises(ValueError, match="attn_<layer>"):
        TopKSuiteTrainer({"resid_0": AutoEncoderTopK(4, 8, 2)}, TopKTrainerConfig(total_steps=1))
    with pytest.raises(ValueError, match="k=9"):
        AutoEncoderTopK(4, 8, 9)


def test_state_dict_roundtrip():
    tr = make()
    world, g = SparseWorld(), torch.Generator().manual_seed(0)
    for s in range(2):
        tr.update(s, world.batch(32, g))
    tr2 = make()
    tr2.load_state_dict(tr.state_dict())
    b = world.batch(32, g)
    m1, m2 = tr.update(2, b), tr2.update(2, b)
    assert m1 == m2
    for n in tr.dicts:
        for a, c in zip(tr.dicts[n].parameters(), tr2.dicts[n].parameters()):
            assert torch.equal(a, c)


def test_auxk_without_relu_reaches_negative_dead_features():
    d = AutoEncoderTopK(4, 8, 1)
    with torch.no_grad():  # every pre-activation is -1
        d.encoder.weight.zero_()
        d.encoder.bias.fill_(-1.0)
    x = torch.randn(10, 4)
    e = torch.randn(10, 4)
    dead = torch.ones(8, dtype=torch.bool)
    auxk_loss(d, x, e, dead, 2, relu=True).backward()
    assert d.encoder.bias.grad.abs().sum() == 0  # ReLU cuts all-negative dead features off
    d.zero_grad()
    auxk_loss(d, x, e, dead, 2, relu=False).backward()
    assert d.encoder.bias.grad.abs().sum() > 0


def test_resampling_reinitialises_exactly_the_dead_features():
    """resample_dead: dead features get a unit decoder column along a token's reconstruction
    error, an encoder row along that token's centred input (0.2 x the live rows' mean norm), a
    zero bias, zero Adam moments and a fresh dead counter; live features do not change."""
    tr = make(F=32, k=3, dead_tokens=64, lr=1e-3)
    world, g = SparseWorld(), torch.Generator().manual_seed(0)
    for s in range(3):
        tr.update(s, world.batch(64, g))
    d = tr.dicts["mlp_0"]
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 5, 9]] = True
    tr.tokens_since_fired["mlp_0"].zero_()
    tr.tokens_since_fired["mlp_0"][dead] = 10**6
    before = {n: p.detach().clone() for n, p in d.named_parameters()}
    batch = world.batch(64, g)
    x, y = tr.io("mlp_0", batch)
    with torch.no_grad():
        err = y - d(x)
    assert tr.resample_dead("mlp_0", batch) == 3
    live = ~dead
    torch.testing.assert_close(d.decoder.weight[:, live], before["decoder.weight"][:, live],
                               rtol=0, atol=0)
    torch.testing.assert_close(d.encoder.weight[live], before["encoder.weight"][live],
                               rtol=0, atol=0)
    assert torch.equal(d.encoder.bias[dead], torch.zeros(3))
    cols = d.decoder.weight[:, dead].T  # each a unit vector along some token's error
    torch.testing.assert_close(cols.norm(dim=1), torch.ones(3))
    cos = cols @ (err / err.norm(dim=1, keepdim=True)).T
    assert bool((cos.max(dim=1).values > 1 - 1e-5).all())
    scale = before["encoder.weight"][live].norm(dim=1).mean()
    torch.testing.assert_close(d.encoder.weight[dead].norm(dim=1), 0.2 * scale * torch.ones(3))
    state = tr.optimizer.state[d.encoder.weight]
    assert not state["exp_avg"][dead].any() and state["exp_avg"][live].any()
    assert not tr.dead_mask("mlp_0").any()
    assert tr.resample_dead("mlp_0", batch) == 0  # nothing dead: nothing changes


def test_resampling_runs_on_its_schedule_until_the_decay():
    tr = make(F=32, k=3, dead_tokens=64, lr=1e-3, total_steps=20, resample_steps=4)
    world, g = SparseWorld(), torch.Generator().manual_seed(0)
    steps = [s for s in range(20) if "mlp_0/resampled" in tr.update(s, world.batch(64, g))]
    assert steps == [3, 7, 11]  # every 4 steps, before the decay starts at step 16
