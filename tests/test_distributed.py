"""Data parallelism with torch.distributed (gloo, 2 CPU processes): one step with global batch B on
2 ranks gives the same weights as one process with batch B."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.scae_fixtures import random_batch, random_connections, random_suite
from trainers.scae import SCAETrainerConfig, TrainerSCAESuite
from trainers.top_k import TopKSuiteTrainer, TopKTrainerConfig

B = 32


def make_trainer(kind: str, total_steps: int | None = 10):
    suite = random_suite(n_layers=2, d=6, F=16, k=3, seed=0, dtype=torch.float32)
    if kind == "scae":
        suite.set_connections(random_connections(suite, C=5, seed=0))
        cfg = SCAETrainerConfig(total_steps=total_steps, kl_coeff=0.0, n_threshold=4, n_random=0,
                                lr=1e-2, warmup_steps=0, act_coeff=0.5, dead_tokens=8)
        return TrainerSCAESuite(suite, cfg)
    cfg = TopKTrainerConfig(total_steps=total_steps, lr=1e-2, warmup_steps=0, dead_tokens=8)
    tr = TopKSuiteTrainer(dict(suite.dicts.items()), cfg)
    tr.initialized = True
    return tr


def half(batch, r: int, world: int):
    sl = slice(r * B // world, (r + 1) * B // world)
    return type(batch)(batch.initial[sl], {k: v[sl] for k, v in batch.src.items()},
                       {k: v[sl] for k, v in batch.tgt.items()},
                       {k: v[sl] for k, v in batch.layernorm_scale.items()})


def steps(tr, world: int, r: int, n: int = 3):
    for s in range(n):
        batch = random_batch(2, 6, B=B, seed=100 + s, dtype=torch.float32)
        tr.update(s, half(batch, r, world))
    return {n_: {k: v.clone() for k, v in d.state_dict().items()} for n_, d in tr.dicts.items()}


def _worker(r: int, world: int, port: int, kind: str, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=r, world_size=world)
    try:
        torch.save(steps(make_trainer(kind), world, r), f"{out}.{r}")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(kind: str, tmp_path):
    single = steps(make_trainer(kind), 1, 0)
    out = str(tmp_path / kind)
    mp.spawn(_worker, args=(2, free_port(), kind, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for name, sd in single.items():
        for k, v in sd.items():
            got = ranks[0][name][k]
            assert torch.equal(got, ranks[1][name][k]), f"ranks disagree on {name}.{k}"
            torch.testing.assert_close(got, v, rtol=1e-6, atol=1e-6, msg=f"{name}.{k}")


def test_scae_finetuning_on_two_ranks_equals_one_process(tmp_path):
    check("scae", tmp_path)


def test_topk_pretraining_on_two_ranks_equals_one_process(tmp_path):
    check("topk", tmp_path)


class RankBatches:
    """Each rank's half of a deterministic global batch stream, resumable."""

    def __init__(self, r: int, world: int):
        self.i, self.r, self.world = 0, r, world

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        batch = random_batch(2, 6, B=B, seed=500 + self.i, dtype=torch.float32)
        return half(batch, self.r, self.world)

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def _resume_worker(r: int, world: int, port: int, out: str):
    from training import TrainConfig, train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=r, world_size=world)
    try:
        def run(folder, **kw):
            tr = make_trainer("scae", total_steps=None)  # the loop's steps set it
            tr.cfg.n_random = 3  # per-rank candidate samplers must resume too
            cfg = TrainConfig(steps=6, out_dir=folder, save_steps=2, **kw)
            return train(tr, RankBatches(r, world), cfg)

        straight = run(f"{out}/straight")
        run(f"{out}/resumed", max_steps_this_run=3)
        resumed = run(f"{out}/resumed", resume=True)
        same = all(torch.equal(a, b) for n in straight.dicts
                   for a, b in zip(straight.dicts[n].state_dict().values(),
                                   resumed.dicts[n].state_dict().values()))
        torch.save(same, f"{out}/same.{r}")
    finally:
        dist.destroy_process_group()


def test_every_rank_resumes_bit_identically(tmp_path):
    mp.spawn(_resume_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert torch.load(tmp_path / "same.0") and torch.load(tmp_path / "same.1")
