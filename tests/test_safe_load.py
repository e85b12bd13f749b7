"""Issue 11: no loader runs code from a file; damaged, old or non-finite files get a sentence
naming the file (and the dictionary and parameter); a full disk says so and leaves no file."""

import errno
import io
import json
import os
import pickle

import pytest
import torch

from dictionary_learning import files
from dictionary_learning.connections import load_connections
from dictionary_learning.dl_format import export_dictionary_learning, load_dictionary_learning
from dictionary_learning.errors import (
    CorruptFileError,
    DiskFullError,
    NonFiniteWeightsError,
    UnsafeFileError,
)
from dictionary_learning.files import atomic_torch_save, atomic_write_json
from tests.scae_fixtures import random_connections, random_suite
from tests.test_reliability import Batches, scae_trainer
from dictionary_learning.suite import SCAESuite
from training import CHECKPOINT, TrainConfig, load_checkpoint, train


class Payload:
    """Unpickling this with code execution creates the file `marker` (evidence it ran)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_evil(path, marker, how: str) -> None:
    """A crafted file: a torch.save zip ("torch") or a plain pickle ("pickle") with a payload
    next to real tensors, so only a loader that builds arbitrary objects would run it."""
    obj = {"mlp_0": {"attn_0": torch.zeros(2, 2, dtype=torch.long)}, "x": Payload(marker)}
    if how == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))


def assert_refused(load, path, marker):
    with pytest.raises(UnsafeFileError) as info:
        load()
    msg = str(info.value)
    assert str(path) in msg and "refusing to load" in msg and "Nothing from it was run" in msg
    assert "weights_only=False" not in msg
    assert not marker.exists(), "the payload ran"


@pytest.fixture
def suite():
    return random_suite(n_layers=2, d=6, F=10, k=2, dtype=torch.float32)


# ---------------------------------------------------------------- malicious pickles, every loader


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_malicious_connections_file(tmp_path, how, suite):
    path, marker = tmp_path / "conns.pt", tmp_path / "PWNED"
    write_evil(path, marker, how)
    assert_refused(lambda: load_connections(path, suite.dict_sizes), path, marker)


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_malicious_training_checkpoint_is_refused_on_resume(tmp_path, how):
    path, marker = tmp_path / CHECKPOINT, tmp_path / "PWNED"
    write_evil(path, marker, how)
    assert_refused(lambda: load_checkpoint(path), path, marker)
    cfg = TrainConfig(steps=2, out_dir=str(tmp_path), resume=True)  # the pipeline's ordinary resume
    assert_refused(lambda: train(scae_trainer(), Batches(), cfg), path, marker)


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_malicious_connections_inside_a_suite(tmp_path, how, suite):
    suite.save_pretrained(tmp_path / "s")
    path, marker = tmp_path / "s" / "connections.pt", tmp_path / "PWNED"
    write_evil(path, marker, how)
    assert_refused(lambda: SCAESuite.from_pretrained(tmp_path / "s"), path, marker)


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_malicious_original_fork_checkpoint(tmp_path, how):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "config.json").write_text(json.dumps({"submodule_configs": {}}))
    path, marker = tmp_path / "s" / "checkpoint.pt", tmp_path / "PWNED"
    write_evil(path, marker, how)
    assert_refused(lambda: SCAESuite.from_pretrained(tmp_path / "s"), path, marker)


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_malicious_dictionary_learning_export(tmp_path, how):
    (tmp_path / "ae").mkdir()
    path, marker = tmp_path / "ae" / "ae.pt", tmp_path / "PWNED"
    write_evil(path, marker, how)
    assert_refused(lambda: load_dictionary_learning(tmp_path / "ae"), path, marker)


def test_plain_pickle_of_tensors_still_loads_without_code(tmp_path, suite):
    conns = random_connections(suite, C=4)
    path = tmp_path / "conns.pkl"
    path.write_bytes(pickle.dumps(conns))
    back = load_connections(path, suite.dict_sizes)
    assert all(torch.equal(back[d][u], conns[d][u]) for d in conns for u in conns[d])


def test_checkpoint_holds_only_tensors_and_plain_containers(tmp_path):
    import numpy  # noqa: F401  (its RNG state must be saved as tensors too)

    train(scae_trainer(), Batches(), TrainConfig(steps=2, out_dir=str(tmp_path)))
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert ckpt["format"] == "scae-checkpoint" and ckpt["format_version"] == 2
    assert "numpy" in ckpt["ranks"][0]["rng"]


def test_old_checkpoint_format_is_refused(tmp_path):
    path = tmp_path / CHECKPOINT
    torch.save({"step": 3, "trainer": {}, "ranks": [], "train_config": {}}, path)
    with pytest.raises(UnsafeFileError, match=rf"{path}.*not a scae-checkpoint file.*Delete"):
        load_checkpoint(path)


# ---------------------------------------------------------------- damaged files


def test_garbage_suite_connections_file(tmp_path, suite):
    suite.save_pretrained(tmp_path / "s")
    path = tmp_path / "s" / "connections.pt"
    path.write_bytes(b"\x80\x02 certainly not a pickle")
    with pytest.raises(CorruptFileError) as info:
        SCAESuite.from_pretrained(tmp_path / "s")
    assert str(path) in str(info.value) and "weights_only" not in str(info.value)


def test_truncated_checkpoint(tmp_path):
    train(scae_trainer(), Batches(), TrainConfig(steps=2, out_dir=str(tmp_path)))
    path = tmp_path / CHECKPOINT
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CorruptFileError, match=rf"{path}.*truncated or corrupt.*Delete"):
        load_checkpoint(path)


def test_truncated_safetensors(tmp_path, suite):
    suite.save_pretrained(tmp_path / "s")
    path = tmp_path / "s" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptFileError, match=rf"{path}.*truncated or corrupt.*again"):
        SCAESuite.from_pretrained(tmp_path / "s")


@pytest.mark.parametrize("text,why", [("", "is empty"), ("{not json", "is not valid JSON"),
                                      ("[1, 2]", "holds a JSON list")])
def test_bad_config_json(tmp_path, suite, text, why):
    suite.save_pretrained(tmp_path / "s")
    path = tmp_path / "s" / "config.json"
    path.write_text(text)
    with pytest.raises(CorruptFileError, match=rf"{path}.*{why}"):
        SCAESuite.from_pretrained(tmp_path / "s")


def test_float_connections_are_refused(tmp_path, suite):
    conns = random_connections(suite, C=4)
    conns["mlp_1"]["attn_0"] = conns["mlp_1"]["attn_0"].float()
    path = tmp_path / "conns.pt"
    torch.save(conns, path)
    with pytest.raises(TypeError, match=rf"{path}.*\['mlp_1'\]\['attn_0'\] must be an integer "
                                        r"tensor \(int64\), got torch.float32.*\.long\(\)"):
        load_connections(path)
    with pytest.raises(TypeError, match=r"must be an integer tensor"):
        suite.set_connections(conns)


# ---------------------------------------------------------------- non-finite weights


def poisoned_suite(tmp_path):
    suite = random_suite(n_layers=2, d=6, F=10, k=2, dtype=torch.float32)
    with torch.no_grad():
        suite.dicts["mlp_1"].encoder.weight[3, 2] = float("nan")
        suite.dicts["mlp_1"].encoder.weight[4, 0] = float("inf")
    suite.save_pretrained(tmp_path / "s")
    return suite


def test_suite_with_nan_weights_is_refused_naming_dictionary_and_parameter(tmp_path):
    poisoned_suite(tmp_path)
    with pytest.raises(NonFiniteWeightsError,
                       match=r"dictionary 'mlp_1' parameter 'encoder.weight' has 1 NaN and 1 Inf "
                             r"values of 60 \(first at index \(3, 2\)\)"):
        SCAESuite.from_pretrained(tmp_path / "s")


def test_evaluation_refuses_a_non_finite_suite_in_memory(tmp_path):
    from evaluate import evaluate_suite
    from tests.helpers import random_contexts, tiny_gpt2

    model, _ = tiny_gpt2(n_layer=2, d_model=6, n_head=2, n_ctx=16)
    suite = poisoned_suite(tmp_path)
    with pytest.raises(NonFiniteWeightsError, match=r"the suite: dictionary 'mlp_1' parameter"):
        evaluate_suite(suite, model, random_contexts(4, 8), progress=False)


def test_checkpoint_with_nan_weights_is_refused(tmp_path):
    train(scae_trainer(), Batches(), TrainConfig(steps=2, out_dir=str(tmp_path)))
    path = tmp_path / CHECKPOINT
    ckpt = load_checkpoint(path)
    ckpt["trainer"]["dicts"]["attn_1"]["b_dec"][0] = float("nan")
    atomic_torch_save(ckpt, path)
    with pytest.raises(
        NonFiniteWeightsError, match=rf"{path}.*dictionary 'attn_1' parameter 'b_dec'"
    ):
        load_checkpoint(path)


def test_dictionary_learning_export_with_inf(tmp_path):
    from dictionary_learning.dictionary import AutoEncoderTopK

    ae = AutoEncoderTopK(6, 10, 2)
    export_dictionary_learning(ae, tmp_path / "ae", layer=0, lm_name="m", submodule_name="s",
                               ctx_len=8)
    state = torch.load(tmp_path / "ae" / "ae.pt", weights_only=True)
    state["decoder.weight"][1, 1] = float("-inf")
    torch.save(state, tmp_path / "ae" / "ae.pt")
    with pytest.raises(
        NonFiniteWeightsError, match=r"ae.pt.*parameter 'decoder.weight' has 0 NaN and 1 Inf"
    ):
        load_dictionary_learning(tmp_path / "ae")


def test_null_metrics_always_come_with_a_note():
    from evaluate import CEMetrics, ModuleMetrics, SuiteEval, eval_to_dict

    nan = float("nan")
    ev = SuiteEval(
        modules={"attn_0": ModuleMetrics(nan, 0.5, 2.0, 2.0, 0.1, nan)},
        ce=CEMetrics(clean=3.0, ablated=3.0, vanilla=3.1, pruned=3.2, recovered_vanilla=nan,
                     recovered_pruned=nan, splice={}),
        n_contexts=1, ctx_len=8, n_tokens=7, n_predictions=6, has_connections=True,
    )
    rep = eval_to_dict(ev)
    assert rep["modules"]["attn_0"]["fvu_vanilla"] is None
    notes = "\n".join(rep["notes"])
    assert (
        "modules.attn_0.fvu_vanilla is null: its value was nan (the target activations have"
        in notes
    )
    assert "modules.attn_0.agreement is null" in notes and "no evaluation token" in notes
    assert "ce.recovered_pruned is null: its value was nan (CE_ablated equals CE_clean" in notes


# ---------------------------------------------------------------- full disk


class FullDisk(io.RawIOBase):
    """A file object whose device fills up after `room` bytes."""

    def __init__(self, room: int):
        self.room = room

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return len(b)


@pytest.mark.parametrize("kind", ["torch", "json"])
def test_full_disk_says_no_space_and_keeps_the_old_file(tmp_path, monkeypatch, kind):
    path = tmp_path / "out.bin"
    path.write_bytes(b"previous")
    monkeypatch.setattr(files, "open", lambda p, mode: FullDisk(64), raising=False)
    save = (lambda: atomic_torch_save({"x": torch.zeros(1000)}, path)) if kind == "torch" else (
        lambda: atomic_write_json(path, {"x": "y" * 1000}))
    with pytest.raises(DiskFullError, match=rf"no space left on device while writing '{path}'.*"
                                            r"Free some space"):
        save()
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_full_disk_while_saving_a_suite(tmp_path, monkeypatch, suite):
    from dictionary_learning import suite_io

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(suite_io, "save_file", full)
    with pytest.raises(
        DiskFullError, match=r"no space left on device while writing .*model.safetensors"
    ):
        suite.save_pretrained(tmp_path / "s")
    assert os.listdir(tmp_path) == []


def test_no_other_code_path_unpickles():
    """Every load goes through safe_load.py: no torch.load / pickle.load elsewhere in the
    library."""
    import re
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    names = subprocess.run(["git", "ls-files", "*.py"], cwd=repo, capture_output=True, text=True,
                           check=True).stdout.split()
    pattern = re.compile(r"torch\.load\(|pickle\.loads?\(|weights_only\s*=\s*False|Unpickler\(")
    allowed = "dictionary_learning/safe_load.py"
    offenders = [n for n in names if not n.startswith("tests/") and n != allowed
                 and pattern.search((repo / n).read_text())]
    assert offenders == []
