"""run_finetuning.py as a notebook (jupytext -> .ipynb -> nbclient, from the repository root) and
its wandb runs (WANDB_MODE=offline), read back from the offline run files.

One quick pipeline serves both: the notebook runs it cold with its constants edited as a user
would (a tiny local GPT-2 and text files instead of the embedded default, QUICK = True), then the
script runs it again with the same settings from the warm cache, which must still log every run.
"""

import json
import math
import os
import struct
from pathlib import Path

import pytest

from tests.helpers import random_texts, tiny_hf_gpt2, tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
STAGES = {"pretrain", "finetune-top", "finetune-random"}


# ------------------------------------------------------------------ offline wandb run reader
def _records(path: Path):
    """The protobuf records of an offline `run-<id>.wandb` file (a leveldb-style log: 32 KiB
    blocks of chunks, each with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a wandb run file"
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def read_offline_run(run_dir: Path) -> dict:
    """{"name", "group", "job_type", "config", "history": [rows], "summary": {...}} of a run."""
    (path,) = run_dir.glob("run-*.wandb")
    out = {"config": {}, "history": [], "summary": {}}
    for rec in _records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(name=rec.run.display_name, group=rec.run.run_group,
                       job_type=rec.run.job_type)
            items = rec.run.config.update
        elif kind == "config":
            items = rec.config.update
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in rec.history.item})
            continue
        elif kind == "summary":
            for i in rec.summary.update:
                if i.key:
                    out["summary"][i.key] = json.loads(i.value_json)
                else:
                    node = out["summary"]
                    for part in i.nested_key[:-1]:
                        node = node.setdefault(part, {})
                    node[i.nested_key[-1]] = json.loads(i.value_json)
            continue
        else:
            continue
        out["config"].update({i.key: json.loads(i.value_json) for i in items})
    return out


def runs_under(out: Path) -> dict[str, dict]:
    runs = [read_offline_run(d) for d in sorted((out / "wandb").glob("offline-run-*"))]
    by_name = {r["name"]: r for r in runs}
    assert len(by_name) == len(runs), f"duplicate run names: {[r['name'] for r in runs]}"
    return by_name


# ------------------------------------------------------------------------------ the run
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    nbformat = pytest.importorskip("nbformat")
    jupytext = pytest.importorskip("jupytext")
    from nbclient import NotebookClient

    tmp = tmp_path_factory.mktemp("nb")
    model_dir = tmp / "gpt2-local"
    tiny_hf_gpt2(n_layer=2, d_model=32, n_ctx=32).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    (tmp / "train.txt").write_text("\n".join(random_texts(800, seed=1, min_len=20, max_len=60)))
    (tmp / "eval.txt").write_text("\n".join(random_texts(100, seed=2, min_len=20, max_len=60)))
    settings = {"QUICK": True, "OUT": str(tmp / "out_nb"), "MODEL": str(model_dir),
                "DATA": str(tmp / "train.txt"), "EVAL_DATA": str(tmp / "eval.txt"), "CTX_LEN": 32,
                "FINETUNE_STEPS": 8, "PRETRAIN_STEPS": 12, "EVAL_TOKENS": 512}

    nb = jupytext.read(REPO / "run_finetuning.py")
    cell = next(c for c in nb.cells if c.cell_type == "code" and "\nPRESET = " in "\n" + c.source)
    # the user's edit: new values for the constants, in the settings cell
    cell.source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in settings.items())
    nbformat.write(nb, tmp / "run_finetuning.ipynb")

    env_keys = ("WANDB_MODE", "SCAE_CACHE", "HF_HUB_OFFLINE", "OMP_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in env_keys}
    os.environ.update(WANDB_MODE="offline", SCAE_CACHE=str(tmp / "cache"), HF_HUB_OFFLINE="1",
                      OMP_NUM_THREADS="1")
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO)}}).execute()
        import run_finetuning

        argv = ["--quick", "--out", str(tmp / "out_script"), "--model", str(model_dir),
                "--data", str(tmp / "train.txt"), "--eval-data", str(tmp / "eval.txt"),
                "--ctx-len", "32", "--steps", "8", "--export", "sparsify"]
        for k, v in (("DICT_SIZE", None), ("PRETRAIN_STEPS", 12), ("EVAL_TOKENS", 512)):
            setattr(run_finetuning, k, v)  # no flags for these: the script's constants
        try:
            run_finetuning.main(argv)
        finally:
            run_finetuning.PRETRAIN_STEPS = run_finetuning.EVAL_TOKENS = None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return tmp, nb


def test_notebook_runs_and_shows_tables_and_plots(pipeline):
    tmp, nb = pipeline
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    tables = [h for h in html if h.startswith("<table>")]
    assert len(tables) == 2 and "mlp_1" in tables[0] and "random_connections" in tables[1]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 2  # fvu_per_layer.png and ce.png, inline
    report = json.loads((tmp / "out_nb" / "report.json").read_text())
    assert report["config"]["C"] == 16 and report["config"]["ctx_len"] == 32  # QUICK + CTX_LEN
    assert report["config"]["wandb_mode"] == "offline"  # $WANDB_MODE over the constant
    assert (tmp / "out_nb" / "finetuned" / "ce.png").is_file()


@pytest.mark.parametrize("out", ["out_nb", "out_script"])
def test_wandb_offline_group(pipeline, out):
    tmp, _ = pipeline
    runs = runs_under(tmp / out)
    assert set(runs) == STAGES | {"evaluation"}
    assert len({r["group"] for r in runs.values()}) == 1  # one group per pipeline run
    report = json.loads((tmp / out / "report.json").read_text())
    for name in STAGES:
        r = runs[name]
        assert r["job_type"] == "train"
        cfg = r["config"]
        assert {"loop", "trainer", "pipeline"} <= set(cfg)
        assert cfg["pipeline"]["dict_size"] == 256 and cfg["pipeline"]["k"] == 8
        if name != "pretrain":
            assert cfg["pipeline"]["C"] == 16
            assert {"coeff", "loss", "lr", "n_threshold"} <= set(cfg["trainer"])
        # the wandb history equals the stage's metrics.jsonl, row for row
        stage_dir = Path(cfg["loop"]["out_dir"])
        rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
        hist = [h for h in r["history"] if any(k.endswith("/fvu") for k in h)]
        assert [h["_step"] for h in hist] == [row["step"] for row in rows]
        fvu_key = "mlp_1/fvu"
        assert [h[fvu_key] for h in hist] == [row[fvu_key] for row in rows]
        assert all(math.isfinite(h[fvu_key]) for h in hist)
    ev = runs["evaluation"]
    assert ev["job_type"] == "evaluate"
    s = ev["summary"]
    assert s["finetuned/ce/recovered_pruned"] == report["ce"]["recovered_pruned"]
    assert s["finetuned/mlp_1/fvu_pruned"] == report["modules"]["mlp_1"]["fvu_pruned"]
    assert s["random_connections/ce/pruned"] == report["random_connections"]["ce"]["pruned"]
    assert s["finetuned/modules"]["_type"] == "table-file"
    assert s["finetuned/modules"]["nrows"] == 4
    assert s["finetuned/ce"]["_type"] == "image-file"
    assert ev["config"]["pipeline"]["C"] == 16


def test_warm_cache_replays_the_same_curves(pipeline):
    tmp, _ = pipeline
    cold, warm = runs_under(tmp / "out_nb"), runs_under(tmp / "out_script")
    assert cold["finetune-top"]["group"] != warm["finetune-top"]["group"]
    for name in STAGES:
        strip = [{k: v for k, v in h.items() if not k.startswith("_") or k == "_step"}
                 for h in cold[name]["history"]]
        again = [{k: v for k, v in h.items() if not k.startswith("_") or k == "_step"}
                 for h in warm[name]["history"]]
        assert strip == again
        assert "replayed_from" in warm[name]["config"]


def test_kernel_finds_the_repository(tmp_path, monkeypatch):
    """A kernel has no __file__: the project is found from the working directory up, or from the
    notebook's path that Jupyter (JPY_SESSION_NAME) gives; elsewhere a clear error."""
    jupytext = pytest.importorskip("jupytext")
    nb = jupytext.read(REPO / "run_finetuning.py")
    cell = next(c.source for c in nb.cells if "def repo_root" in c.source)
    ns = {}
    exec(cell.split("\n# a kernel started")[0], ns)  # the definitions, not the imports after them
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    monkeypatch.chdir(REPO / "tests")
    assert ns["repo_root"]() == REPO
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModuleNotFoundError, match="start the notebook's kernel in the repository"):
        ns["repo_root"]()
    monkeypatch.setenv("JPY_SESSION_NAME", str(REPO / "run_finetuning.ipynb"))
    assert ns["repo_root"]() == REPO
    assert ns["in_notebook"]() is False  # pytest is no kernel: the script path parses flags


def test_pipeline_export_step(pipeline):
    tmp, _ = pipeline
    report = json.loads((tmp / "out_script" / "report.json").read_text())
    assert report["exports"]["sparsify"]["written"] == ["attn_0", "attn_1", "mlp_0", "mlp_1"]
    folder = tmp / "out_script" / "export" / "sparsify" / "h.1.mlp"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["transcode"] is True and cfg["num_latents"] == 256 and cfg["k"] == 8


def test_wandb_mode_order(monkeypatch):
    from dictionary_learning.logger import resolve_wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode("disabled") == "offline"  # the environment over the constant
    assert resolve_wandb_mode("offline", "disabled") == "disabled"  # the flag over both
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    with pytest.raises(ValueError, match="'dryrun'"):
        resolve_wandb_mode("disabled")
