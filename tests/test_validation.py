"""Issue 11: text sources that give no tokens fail at once, and the scripts check their arguments
before any work, each error naming the argument or file and the fix."""

import signal
from itertools import islice

import pytest
import torch

import run_finetuning
from dictionary_learning.data import check_text_source, contexts_from, looks_like_path
from dictionary_learning.validate import (
    check_context, check_ctx_len, check_device, check_out_dir, parse_dtype,
)
from tests.helpers import tiny_tokenizer


@pytest.fixture
def no_hang():
    """Fail (instead of hanging the suite) if the code under test loops for 20 s."""

    def boom(*_):
        raise TimeoutError("looped for 20 s: the source should have failed at once")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def first_context(spec):
    return list(islice(contexts_from(str(spec), tiny_tokenizer(), 16, repeat=True), 1))


# ---------------------------------------------------------------- sources with no tokens


def test_empty_folder(tmp_path, no_hang):
    with pytest.raises(FileNotFoundError, match=rf"data folder '{tmp_path}' has no text files "
                                                r"\(it is empty\)"):
        first_context(tmp_path)


def test_folder_without_text_files(tmp_path, no_hang):
    (tmp_path / "a.csv").write_text("x,y\n")
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(
        FileNotFoundError, match=r"it holds 2 file\(s\), none ending in .txt or .md: a.csv, b.json"
    ):
        first_context(tmp_path)


def test_whitespace_only_file(tmp_path, no_hang):
    f = tmp_path / "blank.txt"
    f.write_text("   \n\n\t  \n")
    with pytest.raises(ValueError, match=rf"text source '{f}' \(train split\) gave no complete "
                                         r"context of ctx_len=16 tokens in a whole pass: it holds "
                                         r"1 document\(s\) with 0 non-whitespace characters"):
        first_context(f)


def test_non_utf8_file_names_the_byte_offset(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"'{f}' is not UTF-8: byte 0xe9 at byte offset 3"):
        check_text_source(str(f))
    with pytest.raises(ValueError, match=r"byte offset 3"):
        first_context(f)


def test_binary_file_as_data(tmp_path):
    (tmp_path / "ok.txt").write_text("fine")
    f = tmp_path / "model.txt"
    f.write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(ValueError, match=rf"'{f}' looks binary \(a NUL byte at byte offset 4\)"):
        check_text_source(str(tmp_path))


def test_missing_data_path_is_not_taken_for_a_dataset_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for spec in [str(tmp_path / "nope.txt"), "./corpus", "data/missing", "~/no/such/file",
                 "shards.jsonl"]:
        with pytest.raises(FileNotFoundError, match=rf"data path '{spec}' does not exist"):
            check_text_source(spec)
    assert not looks_like_path("openwebtext") and not looks_like_path("Skylion007/openwebtext")


# ---------------------------------------------------------------- arguments


def test_out_is_a_regular_file(tmp_path):
    f = tmp_path / "report"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"--out '{f}': '{f}' is a regular file"):
        check_out_dir(f)
    with pytest.raises(NotADirectoryError, match=rf"--out '{f}/sub'.*'{f}' is a regular file"):
        check_out_dir(f / "sub")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu():
    with pytest.raises(ValueError, match=r"--device 'cuda': CUDA is not available.*--device cpu"):
        check_device("cuda")


def test_device_that_does_not_exist():
    with pytest.raises(
        ValueError, match=r"--device 'cuda:64': (CUDA is not available|this machine has)"
    ):
        check_device("cuda:64")
    with pytest.raises(ValueError, match=r"--device 'gpu0' is not a device name"):
        check_device("gpu0")


def test_ctx_len_evaluation_cannot_use():
    with pytest.raises(ValueError, match=r"--ctx-len 2 is too short.*>= 3"):
        check_ctx_len(2)
    with pytest.raises(ValueError, match=r"--ctx-len 64 exceeds the model's n_positions=32"):
        check_ctx_len(64, 32)


def pipeline_argv(tmp_path, *extra):
    return ["--quick", "--out", str(tmp_path / "out"), "--device", "cpu", *extra]


@pytest.mark.parametrize("case", ["out_file", "cache_file", "device", "ctx_len", "float_conns",
                                  "missing_data", "missing_conns"])
def test_pipeline_fails_before_any_work(tmp_path, monkeypatch, case):
    """Each bad argument stops run_finetuning before the model is even loaded."""
    monkeypatch.setenv("SCAE_CACHE", str(tmp_path / "cache"))

    def no_work(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(run_finetuning, "load_model", no_work)
    argv = pipeline_argv(tmp_path)
    if case == "out_file":
        (tmp_path / "out").write_text("x")
        err, pat = NotADirectoryError, r"--out .* is a regular file"
    elif case == "cache_file":
        (tmp_path / "cache").write_text("x")
        err, pat = NotADirectoryError, rf"SCAE_CACHE '{tmp_path / 'cache'}'.*is a regular file"
    elif case == "device":
        argv = ["--quick", "--out", str(tmp_path / "out"), "--device", "cuda:64"]
        err, pat = ValueError, r"--device 'cuda:64'"
    elif case == "ctx_len":
        argv += ["--ctx-len", "2"]
        err, pat = ValueError, r"--ctx-len 2 is too short"
    elif case == "float_conns":
        torch.save({"mlp_0": {"attn_0": torch.zeros(4, 2)}}, tmp_path / "c.pt")
        argv += ["--connections", str(tmp_path / "c.pt")]
        err, pat = TypeError, r"c.pt'.*must be an integer tensor \(int64\), got torch.float32"
    elif case == "missing_data":
        argv += ["--data", str(tmp_path / "corpus")]
        err, pat = FileNotFoundError, r"data path '.*corpus' does not exist"
    else:
        argv += ["--connections", str(tmp_path / "conns.pt")]
        err, pat = FileNotFoundError, r"connections file '.*conns.pt' does not exist"
    with pytest.raises(err, match=pat):
        run_finetuning.main(argv)
    assert not (tmp_path / "cache" / "pipeline").exists()


def test_parse_dtype_and_context_checks():
    assert parse_dtype("float32") is torch.float32 and parse_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match=r"--dtype 'float16' is not supported; use one of"):
        parse_dtype("float16")
    assert check_context(torch.tensor([1, 2, 3], dtype=torch.int32), 0, 3).dtype == torch.long
    with pytest.raises(TypeError, match=r"context 4 is not a 1-D LongTensor"):
        check_context(torch.zeros(3), 4)
    with pytest.raises(ValueError, match=r"context 2 has 4 tokens, expected 3"):
        check_context(torch.arange(4), 2, 3)
    check_ctx_len(2, 16, "ctx_len", minimum=2)
    with pytest.raises(ValueError, match=r"ctx_len 1 is too short.*>= 2"):
        check_ctx_len(1, 16, "ctx_len", minimum=2)
