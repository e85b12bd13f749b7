"""Bad input, faults and resuming, tried as a new user would (issue 7).

Each error test asserts the exception type and that the message names what is wrong and the fix.
"""

import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from buffer import AllActivationBuffer
from dictionary_learning.connections import load_connections, save_connections
from dictionary_learning.data import token_contexts
from dictionary_learning.dictionary import AutoEncoderTopK, TopKTranscoder
from dictionary_learning.model import check_supported
from tests.helpers import random_contexts, tiny_gpt2, tiny_tokenizer
from tests.scae_fixtures import random_batch, random_connections, random_suite
from dictionary_learning.suite import SCAESuite
from trainers.scae import SCAETrainerConfig, TrainerSCAESuite

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def suite():
    return random_suite(n_layers=2, d=6, F=10, k=2, dtype=torch.float32)


# ------------------------------------------------------------------ connections


def good(suite):
    return random_connections(suite, C=4)


def test_connections_wrong_shape(suite):
    conns = good(suite)
    conns["mlp_1"]["attn_0"] = conns["mlp_1"]["attn_0"][:7]
    with pytest.raises(
        ValueError, match=r"connections\['mlp_1'\]\['attn_0'\].*shape \(7, \d+\).*F_down=10"
    ):
        suite.set_connections(conns)


def test_connections_index_too_large(suite):
    conns = good(suite)
    conns["mlp_1"]["mlp_0"][3, 0] = 10
    with pytest.raises(
        ValueError, match=r"\['mlp_1'\]\['mlp_0'\]: index 10 at feature 3.*\[0, 10\) or -1"
    ):
        suite.set_connections(conns)


def test_connections_index_below_minus_one(suite):
    conns = good(suite)
    conns["mlp_0"]["attn_0"][2, 0] = -2
    with pytest.raises(
        ValueError, match=r"\['mlp_0'\]\['attn_0'\]: index -2 at feature 2.*or -1 for padding"
    ):
        suite.set_connections(conns)


def test_connections_unknown_module_name(suite):
    conns = good(suite)
    conns["mlp_1"]["resid_0"] = conns["mlp_1"].pop("attn_0")
    with pytest.raises(
        ValueError, match=r"unknown module name 'resid_0'.*'attn_<layer>' or 'mlp_<layer>'"
    ):
        suite.set_connections(conns)


def test_connections_from_a_later_layer(suite):
    conns = good(suite)
    conns["mlp_0"]["attn_1"] = conns["mlp_1"]["attn_1"]
    with pytest.raises(ValueError, match=r"'attn_1' is not upstream of 'mlp_0'.*attn_l for l <= L"):
        suite.set_connections(conns)
    conns = good(suite)
    conns["mlp_1"]["mlp_1"] = conns["mlp_1"]["mlp_0"]
    with pytest.raises(ValueError, match=r"'mlp_1' is not upstream of 'mlp_1'.*mlp_l for l < L"):
        suite.set_connections(conns)


def test_connections_pickle_that_is_not_a_dict(tmp_path, suite):
    path = tmp_path / "conns.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(TypeError, match=r"holds a list, not a dict.*pass a connections file"):
        load_connections(path, suite.dict_sizes)


def test_connections_file_made_for_another_dict_size(tmp_path, suite):
    other = random_suite(n_layers=2, d=6, F=14, k=2)
    path = tmp_path / "conns.pt"
    save_connections(random_connections(other, C=4), path)
    with pytest.raises(
        ValueError, match=r"shape \(14, \d+\); expected \[F_down=10, C\].*another dict_size"
    ):
        load_connections(path, suite.dict_sizes)


def test_original_pickle_format_is_readable(tmp_path, suite):
    conns = good(suite)
    path = tmp_path / "conns.pkl"
    with open(path, "wb") as fh:
        pickle.dump(conns, fh)
    back = load_connections(path, suite.dict_sizes)
    assert all(torch.equal(back[d][u], conns[d][u]) for d in conns for u in conns[d])


def test_missing_connections_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*find_top_connections"):
        load_connections(tmp_path / "nope.pt")


# ------------------------------------------------------------------ configuration


def test_suite_width_does_not_fit_model():
    model, _ = tiny_gpt2(n_layer=2, d_model=32)
    buf = AllActivationBuffer(model, iter(random_contexts(64, 9)), n_tokens=256, out_batch_size=64)
    suite = random_suite(n_layers=2, d=6, F=10, k=2, dtype=torch.float32)
    with pytest.raises(
        ValueError, match=r"d_model=6 but the buffer's model has d_model=32.*trained on this model"
    ):
        suite.check_fits(buf.n_layers, buf.d_model, "the buffer's model")
    with pytest.raises(
        ValueError,
        match=r"attn_0: the batch has width 32 but the dictionary expects 6.*d_model mismatch",
    ):
        suite.vanilla_forward(next(buf))


def test_k_plus_n_threshold_larger_than_F(suite):
    suite.set_connections(good(suite))
    with pytest.raises(
        ValueError,
        match=r"mlp_0: k \+ n_threshold \+ n_random = 2 \+ 9 \+ 0 exceeds dict_size 10; lower",
    ):
        TrainerSCAESuite(suite, SCAETrainerConfig(total_steps=1, n_threshold=9, n_random=0))
    with pytest.raises(ValueError, match=r"exceeds dict_size 10; lower n_threshold or n_random"):
        batch = random_batch(2, 6, dtype=torch.float32)
        suite.pruned_forward(batch, mode="candidates", n_threshold=9)


def test_incomplete_suite():
    with pytest.raises(ValueError, match=r"lacks \['mlp_1'\].*for every layer"):
        SCAESuite({"attn_0": AutoEncoderTopK(4, 8, 2), "mlp_0": TopKTranscoder(4, 4, 8, 2),
                   "attn_1": AutoEncoderTopK(4, 8, 2)})


# ------------------------------------------------------------------ data and model


def tiny_model():
    model, _ = tiny_gpt2(n_layer=1, d_model=16, n_ctx=16)
    return model


def test_empty_data_iterator():
    with pytest.raises(ValueError, match=r"no complete context.*text source"):
        AllActivationBuffer(tiny_model(), iter([]), n_tokens=64, out_batch_size=16)


def test_data_iterator_with_non_strings():
    contexts = token_contexts(iter(["fine text", 42]), tiny_tokenizer(), 8)
    with pytest.raises(TypeError, match=r"item 1 is a int, not a str.*must yield strings"):
        list(contexts)


def test_documents_all_shorter_than_a_context_are_packed_or_exhausted():
    tok = tiny_tokenizer()
    short = ["ab", "cd"]  # 6 tokens with separators: not one context of 16
    with pytest.raises(ValueError, match=r"no complete context"):
        AllActivationBuffer(tiny_model(), token_contexts(iter(short), tok, 16), n_tokens=64,
                            out_batch_size=16)


def test_data_runs_out_during_training():
    from dictionary_learning.errors import DataExhaustedError

    buf = AllActivationBuffer(
        tiny_model(), iter(random_contexts(5, 9)), n_tokens=40, out_batch_size=16
    )
    next(buf)
    next(buf)
    with pytest.raises(DataExhaustedError, match=r"ran out.*more data|fewer steps"):
        for _ in range(10):
            next(buf)


def test_model_of_no_supported_family():
    class NotGPT2(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    with pytest.raises(TypeError, match=r"NotGPT2 .* is not a supported family; supported: "
                                        r"gpt2 \(GPT2LMHeadModel\), gpt_neox"):
        check_supported(NotGPT2())


# ------------------------------------------------------------------ faults


class Batches:
    """A deterministic resumable stand-in for the buffer over random suite batches."""

    def __init__(self, n_layers=2, d=6, B=32):
        self.i, self.n_layers, self.d, self.B = 0, n_layers, d, B

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        return random_batch(
            self.n_layers, self.d, B=self.B, seed=1000 + self.i, dtype=torch.float32
        )

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def scae_trainer(seed=0):
    suite = random_suite(n_layers=2, d=6, F=12, k=2, seed=seed, dtype=torch.float32)
    suite.set_connections(random_connections(suite, C=4, seed=seed))
    # steps: from the loop
    cfg = SCAETrainerConfig(n_threshold=3, n_random=2, lr=1e-2, kl_coeff=0.0)
    return TrainerSCAESuite(suite, cfg)


def test_resume_after_kill_at_random_step_is_bit_identical(tmp_path):
    """A real process is SIGKILLed mid-run, resumed, and compared with an uninterrupted run."""
    kill_at = int(torch.randint(3, 11, (1,)))
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from tests.test_reliability import Batches, scae_trainer
        from training import TrainConfig, train
        out, kill = sys.argv[1], int(sys.argv[2])
        def cb(step, metrics):
            if step + 1 == kill:
                os.kill(os.getpid(), signal.SIGKILL)
        cfg = TrainConfig(steps=12, out_dir=out, save_steps=2, resume=True)
        tr = train(scae_trainer(), Batches(), cfg, callback=cb if kill else None)
        final = {{n: d.state_dict() for n, d in tr.dicts.items()}}
        torch.save(final, os.path.join(out, "final.pt"))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = lambda out, kill: subprocess.run([sys.executable, "-c", script, str(out), str(kill)],  # noqa: E731
                                           env=env, capture_output=True, text=True, cwd=REPO)
    killed = run(tmp_path / "a", kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "a" / "final.pt").exists()
    resumed = run(tmp_path / "a", 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = run(tmp_path / "b", 0)
    assert straight.returncode == 0, straight.stderr[-2000:]
    a = torch.load(tmp_path / "a" / "final.pt")
    b = torch.load(tmp_path / "b" / "final.pt")
    for n in a:
        for k in a[n]:
            assert torch.equal(a[n][k], b[n][k]), (kill_at, n, k)


def test_saved_suite_with_missing_or_unexpected_key(tmp_path, suite):
    from safetensors.torch import load_file, save_file

    suite.save_pretrained(tmp_path / "s")
    f = tmp_path / "s" / "model.safetensors"
    t = load_file(str(f))
    t["mlp_0.extra"] = torch.zeros(1)
    del t["attn_1.b_dec"]
    save_file(t, str(f))
    with pytest.raises(
        KeyError, match=r"missing keys: \['attn_1.b_dec'\]; unexpected keys: \['mlp_0.extra'\]"
    ):
        SCAESuite.from_pretrained(tmp_path / "s")


def test_no_tokens_or_keys_in_the_code():
    patterns = [r"hf_[A-Za-z0-9]{30,}", r"\b[0-9a-f]{40}\b", r"sk-[A-Za-z0-9]{20,}",
                r"wandb\.login\(\s*key\s*=\s*['\"]"]
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.txt", "*.toml", ".ci/*"],
                           cwd=REPO, capture_output=True, text=True).stdout.split()
    for name in files:
        text = (REPO / name).read_text(errors="ignore")
        for pat in patterns:
            assert not re.search(pat, text), f"{name} looks like it holds a secret ({pat})"


def test_buffer_memory_bound_is_honoured():
    model, _ = tiny_gpt2(n_layer=1, d_model=16, n_ctx=16)
    bound = 200
    buf = AllActivationBuffer(
        model, iter(random_contexts(200, 16)), n_tokens=bound, out_batch_size=32
    )
    for _ in range(20):
        next(buf)
        assert buf.peak_stored_tokens <= bound
        stored = next(iter(buf._store.values())).shape[0]
        assert stored <= bound
