import json
import os

import pytest
import torch

from dictionary_learning.dictionary import AutoEncoderTopK, TopKTranscoder
from dictionary_learning.errors import DataExhaustedError, NonFiniteLossError
from dictionary_learning.logger import MetricsLogger
from tests.test_top_k import FakeBuffer, SparseWorld
from trainers.top_k import TopKSuiteTrainer, TopKTrainerConfig
from training import CHECKPOINT, TrainConfig, load_checkpoint, train


def make_trainer(steps=6):
    torch.manual_seed(123)
    dicts = {"attn_0": AutoEncoderTopK(16, 32, 3), "mlp_0": TopKTranscoder(16, 16, 32, 3)}
    # dead_tokens small so AuxK is active and its state matters for resume
    cfg = TopKTrainerConfig(total_steps=steps, warmup_steps=2, lr=1e-2, dead_tokens=64)
    return TopKSuiteTrainer(dicts, cfg)


def weights(tr):
    return {f"{n}.{k}": v for n, d in tr.dicts.items() for k, v in d.state_dict().items()}


class Stop(Exception):
    pass


def test_resume_bit_identical(tmp_path):
    world = SparseWorld()
    ref = train(make_trainer(), FakeBuffer(world, 64, seed=1),
                TrainConfig(steps=6, out_dir=str(tmp_path / "a"), log_steps=1))

    out = str(tmp_path / "b")
    def die(step, m):
        if step == 3:  # crash during step 4, after the step-2 checkpoint
            raise Stop
    with pytest.raises(Stop):
        train(make_trainer(), FakeBuffer(world, 64, seed=1),
              TrainConfig(steps=6, out_dir=out, save_steps=2, log_steps=1), callback=die)
    assert load_checkpoint(os.path.join(out, CHECKPOINT))["step"] == 2
    torch.manual_seed(999)  # resume must not depend on the process's RNG state
    res = train(make_trainer(), FakeBuffer(world, 64, seed=1),
                TrainConfig(steps=6, out_dir=out, save_steps=2, resume=True, log_steps=1))
    wa, wb = weights(ref), weights(res)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # step 3 of the crashed run dropped
    assert "attn_0/fvu" in rows[-1]
    assert os.path.isfile(os.path.join(out, "curves.png"))


def test_max_steps_this_run_then_resume(tmp_path):
    world = SparseWorld()
    ref = train(make_trainer(), FakeBuffer(world, 64, seed=1),
                TrainConfig(steps=6, out_dir=str(tmp_path / "a")))
    out = str(tmp_path / "b")
    train(make_trainer(), FakeBuffer(world, 64, seed=1),
          TrainConfig(steps=6, out_dir=out, max_steps_this_run=4))
    assert load_checkpoint(os.path.join(out, CHECKPOINT))["step"] == 4
    res = train(make_trainer(), FakeBuffer(world, 64, seed=1),
                TrainConfig(steps=6, out_dir=out, resume=True))
    for k, v in weights(ref).items():
        assert torch.equal(v, weights(res)[k]), k


@pytest.mark.parametrize("exc", [OSError("disk full (simulated)"),
                                 KeyboardInterrupt("killed between the write and the rename")])
def test_interrupted_checkpoint_write(tmp_path, monkeypatch, exc):
    """A failure (or a kill) between the temporary write and the rename keeps the previous
    checkpoint and leaves no temporary file."""
    world = SparseWorld()
    out = tmp_path / "c"
    real_replace = os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        if str(dst).endswith(CHECKPOINT):
            calls["n"] += 1
            if calls["n"] == 2:  # second checkpoint write (step 4) fails
                raise exc
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(type(exc)):
        train(make_trainer(), FakeBuffer(world, 64, seed=1),
              TrainConfig(steps=6, out_dir=str(out), save_steps=2))
    assert load_checkpoint(out / CHECKPOINT)["step"] == 2
    assert sorted(p.name for p in out.iterdir() if "tmp" in p.name) == []


def test_nan_stops_and_keeps_checkpoint(tmp_path):
    world = SparseWorld()

    class NanBuffer(FakeBuffer):
        def __next__(self):
            b = super().__next__()
            if self.served == 4:
                b.src["attn_0"][0, 0] = float("nan")
            return b

    out = tmp_path / "n"
    with pytest.raises(NonFiniteLossError, match=r"'attn_0'.*step 3"):
        train(make_trainer(), NanBuffer(world, 64, seed=1),
              TrainConfig(steps=6, out_dir=str(out), save_steps=2))
    ck = load_checkpoint(out / CHECKPOINT)
    assert ck["step"] == 2
    for sd in ck["trainer"]["dicts"].values():
        assert all(torch.isfinite(v).all() for v in sd.values())


def test_data_exhausted(tmp_path):
    with pytest.raises(DataExhaustedError, match="step 3"):
        train(make_trainer(), FakeBuffer(SparseWorld(), 64, n_batches=3),
              TrainConfig(steps=6, out_dir=str(tmp_path)))


def test_logger_online_without_key(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "nonexistent_netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with caplog.at_level("WARNING"):
        ml = MetricsLogger(tmp_path, wandb_mode="online", project="p", run_name="r", config={})
    assert sum("no wandb API key" in r.message for r in caplog.records) == 1
    ml.log({"loss": 1.0, "attn_0/fvu": 0.5}, step=1)
    ml.log({"loss": 0.5, "attn_0/fvu": 0.25}, step=2)
    ml.finish()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert (tmp_path / "curves.png").is_file()
    with pytest.raises(ValueError, match="wandb_mode"):
        MetricsLogger(tmp_path, wandb_mode="on")


def test_resume_bit_identical_real_buffer(tmp_path):
    from buffer import AllActivationBuffer
    from tests.helpers import random_contexts, tiny_gpt2

    model, _ = tiny_gpt2(n_layer=2, d_model=32)
    ctxs = random_contexts(40, 16)
    kw = dict(n_tokens=150, out_batch_size=32, model_batch_size=4, seed=3)

    def trainer():
        torch.manual_seed(7)
        dicts = {}
        for l in range(2):
            dicts[f"attn_{l}"] = AutoEncoderTopK(32, 64, 4)
            dicts[f"mlp_{l}"] = TopKTranscoder(32, 32, 64, 4)
        return TopKSuiteTrainer(dicts, TopKTrainerConfig(total_steps=8, warmup_steps=2,
                                                         dead_tokens=64))

    ref = train(trainer(), AllActivationBuffer(model, iter(ctxs), **kw),
                TrainConfig(steps=8, out_dir=str(tmp_path / "a")))
    out = str(tmp_path / "b")
    train(trainer(), AllActivationBuffer(model, iter(ctxs), **kw),
          TrainConfig(steps=8, out_dir=out, save_steps=3, max_steps_this_run=5))
    assert load_checkpoint(os.path.join(out, CHECKPOINT))["step"] == 5
    res = train(trainer(), AllActivationBuffer(model, iter(ctxs), **kw),
                TrainConfig(steps=8, out_dir=out, save_steps=3, resume=True))
    for k, v in weights(ref).items():
        assert torch.equal(v, weights(res)[k]), k


def test_step_count_has_one_source(tmp_path):
    """TrainConfig.steps sets the trainer's lr schedule (total_steps None); a total_steps that
    disagrees with it is refused, and one that agrees gives the same run."""
    world = SparseWorld()
    given = make_trainer(steps=6)
    free = make_trainer(steps=None)  # no step count of its own
    assert free.scheduler is None
    for tr, d in ((given, "a"), (free, "b")):
        train(tr, FakeBuffer(world, 64, seed=1), TrainConfig(steps=6, out_dir=str(tmp_path / d)))
    assert free.cfg.total_steps == 6
    for k, v in weights(given).items():
        assert torch.equal(v, weights(free)[k]), k
    with pytest.raises(ValueError, match=r"total_steps=6 disagrees with the training loop's "
                                         r"steps=8; leave total_steps None"):
        train(make_trainer(steps=6), FakeBuffer(world, 64, seed=1),
              TrainConfig(steps=8, out_dir=str(tmp_path / "c")))
