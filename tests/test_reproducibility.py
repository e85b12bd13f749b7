"""Two cold runs of the quick pipeline, in separate processes, give bitwise-identical artifacts.

The two processes differ in everything a user's environment may change but the settings must not
depend on: $OMP_NUM_THREADS (torch's default thread count; the cause of issue 18: CPU reductions
over >= 2^16 elements round differently with 1 and 2 threads), $PYTHONHASHSEED (set and dict
order) and the cache folder. One test per stage, so that a failure names the stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dictionary_learning.reproducibility import (
    configure_determinism,
    connections_digest,
    first_difference,
    load_tensors,
    report_digest,
    tensor_digest,
)
from tests.helpers import random_texts, tiny_hf_gpt2, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
D_MODEL = 64
# 1024 tokens x d_model 64 = 2^16 elements per FVU sum: large enough for torch to split the sum
# across threads, so the test fails when the thread count is not fixed.
BATCH_TOKENS = 1024

DRIVER = f"""
import sys
import run_finetuning as rf
model, train, evl, out = sys.argv[1:5]
cfg = rf.make_config("tiny", quick=True, model=model, data=train, eval_data=evl, ctx_len=32,
                     batch_tokens={BATCH_TOKENS}, pretrain_steps=8, finetune_steps=6,
                     connection_tokens=2048, dict_size=128)
rf.run(cfg, out)
"""


def _run(tmp: Path, name: str, inputs: Path, env_extra: dict[str, str]) -> Path:
    cache = tmp / name / "cache"
    out = tmp / name / "out"
    env = {**os.environ, "SCAE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", **env_extra}
    cmd = [sys.executable, "-c", DRIVER, str(inputs / "model"), str(inputs / "train.txt"),
           str(inputs / "eval.txt"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, f"pipeline run {name} failed:\n{proc.stderr[-3000:]}"
    return tmp / name


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """(run a, run b): folders with cache/pipeline/... and out/report.json."""
    tmp = tmp_path_factory.mktemp("repro")
    inputs = tmp / "inputs"
    tiny_hf_gpt2(n_layer=2, d_model=D_MODEL, n_ctx=32).save_pretrained(inputs / "model")
    tiny_tokenizer().save_pretrained(inputs / "model")
    (inputs / "train.txt").write_text("\n".join(random_texts(1500, seed=1, min_len=20, max_len=60)))
    (inputs / "eval.txt").write_text("\n".join(random_texts(150, seed=2, min_len=20, max_len=60)))
    a = _run(tmp, "a", inputs, {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "1"})
    b = _run(tmp, "b", inputs, {"OMP_NUM_THREADS": "2", "PYTHONHASHSEED": "2"})
    return a, b


def _artifact(run: Path, prefix: str) -> Path:
    """The one cached artifact of a stage (folder `<prefix>-<key>` or file `<prefix>-<key>.pt`)."""
    found = sorted((run / "cache" / "pipeline").glob(f"{prefix}-*"))
    assert len(found) == 1, f"expected one cached {prefix!r} artifact, found {found}"
    return found[0] / "suite" if found[0].is_dir() else found[0]


def _report(run: Path) -> dict:
    return json.loads((run / "out" / "report.json").read_text())


@pytest.mark.parametrize(
    "stage, prefix",
    [("pretraining", "pretrain"), ("connections", "connections"),
     ("finetuning (top-C)", "finetune-top"), ("finetuning (random)", "finetune-random")],
)
def test_stage_is_bitwise_reproducible(two_runs, stage, prefix):
    a, b = two_runs
    diff = first_difference(load_tensors(_artifact(a, prefix)), load_tensors(_artifact(b, prefix)))
    assert diff is None, f"{stage} differs between two cold runs: {diff}"


def test_reports_are_identical(two_runs):
    a, b = two_runs
    ra, rb = _report(a), _report(b)
    for section in ("digests", "before_finetuning", "modules", "ce", "random_connections"):
        assert ra[section] == rb[section], f"report section {section!r} differs between the runs"
    assert report_digest(ra) == report_digest(rb)
    assert ra["config"]["threads"] == 2


def test_report_digests_name_every_stage(two_runs):
    digests = _report(two_runs[0])["digests"]
    assert set(digests) == {"pretrained", "connections", "finetuned", "random_connections",
                            "finetuned_random"}
    assert digests["pretrained"] != digests["finetuned"] != digests["finetuned_random"]


def test_thread_count_changes_the_bits():
    """Why the thread count is a setting: the same sum with 1 and 2 threads rounds differently.

    If a torch release makes CPU reductions thread-count invariant, this test fails: the pinned
    thread count (PipelineConfig.threads) can then be relaxed."""
    before = torch.get_num_threads()
    try:
        differs = 0
        for seed in range(8):
            x = torch.randn(BATCH_TOKENS * D_MODEL, generator=torch.Generator().manual_seed(seed))
            torch.set_num_threads(1)
            one = x.pow(2).sum()
            torch.set_num_threads(2)
            two = x.pow(2).sum()
            differs += int(not torch.equal(one, two))
    finally:
        torch.set_num_threads(before)
    assert differs > 0


def test_finetuning_step_is_bitwise_repeatable_at_full_batch_sizes():
    """The quick pipeline's batches are too small for torch to split its scatter kernels over
    threads; at the default run's sizes it does. The backward of advanced indexing with repeated
    indices (index_put_ with accumulate) then adds in a varying order on a 2-thread CPU: the
    encoder-bias gather of the candidates was such a gather, and the same step's gradients
    differed from call to call (8 distinct of 8)."""
    from tests.scae_fixtures import random_batch, random_connections, random_suite
    from trainers.scae import SCAETrainerConfig, TrainerSCAESuite

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        suite = random_suite(n_layers=2, d=32, F=256, k=8, dtype=torch.float32)
        suite.set_connections(random_connections(suite, C=16))
        batch = random_batch(n_layers=2, d=32, B=4096, dtype=torch.float32)
        tr = TrainerSCAESuite(suite, SCAETrainerConfig(total_steps=1, kl_coeff=0.0, n_threshold=16))
        digests = set()
        for _ in range(6):
            losses, _, _ = tr.losses(batch)
            grads = torch.autograd.grad(sum(losses.values()), tr.parameters())
            digests.add(tensor_digest({str(i): g for i, g in enumerate(grads)}))
    finally:
        torch.set_num_threads(before)
    assert len(digests) == 1


def test_configure_determinism_checks_threads():
    with pytest.raises(ValueError, match="threads"):
        configure_determinism(threads=0)


def test_digests_and_first_difference():
    a = {"x": torch.arange(6.0).view(2, 3), "y": torch.zeros(2, dtype=torch.long)}
    b = {"y": a["y"].clone(), "x": a["x"].clone()}
    assert tensor_digest(a) == tensor_digest(b)  # independent of dict order
    assert first_difference(a, b) is None
    b["x"][1, 2] = torch.nextafter(b["x"][1, 2], torch.tensor(100.0))  # one ulp
    assert tensor_digest(a) != tensor_digest(b)
    assert first_difference(a, b).startswith("x: 1 of 6 elements differ")
    assert "different tensor names" in first_difference(a, {"x": a["x"]})


def test_finetuning_cache_is_keyed_on_the_connections(tmp_path, monkeypatch):
    """A run with other connections (another C, or a connections file) must not reuse the suite
    finetuned with the old ones."""
    import run_finetuning as rf
    from tests.scae_fixtures import random_connections, random_suite

    def fake_train(buffer, *, suite, connections, train_cfg, **_):
        suite.set_connections(connections)
        suite.save_pretrained(Path(train_cfg.out_dir) / "suite")

    monkeypatch.setattr(rf, "train_scae_suite", fake_train)
    monkeypatch.setattr(rf, "make_buffer", lambda *a, **k: None)
    suite = random_suite(dtype=torch.float32)
    cfg = rf.make_config("tiny", quick=True, device="cpu")
    conns_a, conns_b = random_connections(suite, 3, seed=0), random_connections(suite, 3, seed=1)
    cache, hashes = tmp_path / "pipeline", {"model": "model-hash", "data": "data-hash"}
    cache.mkdir()
    tuned_a = rf.finetuned(cfg, suite, conns_a, "top", None, cache, "suite-hash", hashes, {})
    tuned_b = rf.finetuned(cfg, suite, conns_b, "top", None, cache, "suite-hash", hashes, {})
    assert len(list(cache.glob("finetune-top-*"))) == 2
    for tuned, conns in ((tuned_a, conns_a), (tuned_b, conns_b)):
        suite.set_connections(conns)  # the exchange format as the suite stores it
        assert connections_digest(tuned.connections) == connections_digest(suite.connections)
