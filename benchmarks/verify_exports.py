"""Check export.py's files with the real libraries, each in its own environment.

    # 1. in this project's environment: export a suite in every format, with reference outputs
    python benchmarks/verify_exports.py make --suite SUITE_DIR --out /tmp/exports
    # 2. in an environment holding the library (none of them imports this project):
    VENV/bin/python benchmarks/verify_exports.py check --dir /tmp/exports --library saelens
    VENV/bin/python benchmarks/verify_exports.py check --dir /tmp/exports --library sparsify
    VENV/bin/python benchmarks/verify_exports.py check --dir /tmp/exports \
        --library dictionary_learning

`make` feeds real activations of the suite's model (the embedded default unless the suite says
otherwise) through every dictionary and stores inputs, features and reconstructions in
`reference.safetensors`; `check` loads each export with the library's own loader, runs its
encode/decode on the same inputs and prints the largest differences. PyPI `dictionary-learning`
installs a package named `dictionary_learning`, like this project's: run `check` from outside the
repository root (the script's own folder is benchmarks/, so it is safe as written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

N_TOKENS = 1024


def make(suite_dir: str, out: Path, data: str) -> None:
    """Export in every format and write reference.safetensors (project environment)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import export
    from buffer import AllActivationBuffer
    from dictionary_learning.metrics import fvu
    from dictionary_learning.data import contexts_from
    from dictionary_learning.model import load_model
    from dictionary_learning.suite_io import load_suite

    files = load_suite(suite_dir)
    model = load_model(files.meta.get("model_name") or "scae-shakespeare")
    ctx_len = (files.meta.get("buffer") or {}).get("ctx_len", 128)
    buf = AllActivationBuffer(model, contexts_from(data, model.tokenizer, ctx_len,
                                                   split="validation"),
                              n_tokens=4 * N_TOKENS, out_batch_size=N_TOKENS, seed=0)
    batch = next(buf)
    ref = {}
    with torch.no_grad():
        for name, d in files.dicts.items():
            x = batch.src[name].float()
            recon, feats = d.float()(x, output_features=True)
            ref[f"{name}.x"], ref[f"{name}.recon"] = x, recon
            ref[f"{name}.f"] = feats.dense(d.dict_size)
            y = batch.tgt[name].float()
            ref[f"{name}.fvu"] = fvu(y, recon).reshape(1)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ref.items()}, str(out / "reference.safetensors"))
    for fmt in export.FORMATS:
        res = export.export_suite(suite_dir, out / fmt, fmt)
        print(f"{fmt}: {len(res.written)} written, skipped {sorted(res.skipped)}")


def check(folder: Path, library: str) -> None:
    """Load each export with `library` and compare to reference.safetensors (library's env)."""
    ref = load_file(str(folder / "reference.safetensors"))
    manifest = json.loads((folder / library / "export.json").read_text())
    print(f"{library}: {len(manifest['written'])} dictionaries, "
          f"skipped {sorted(manifest['skipped'])}")
    print(f"{'module':<8} {'folder':<24} {'max |f - f_ours|':>17} {'max |recon - ours|':>19} "
          f"{'max |f_ours|':>13} {'FVU (ours)':>11}")
    if library == "saelens":
        from sae_lens import SAE

        def run(path: Path, x):
            sae = SAE.load_from_disk(str(path))
            assert sae.cfg.architecture() == "topk", sae.cfg.architecture()
            f = sae.encode(x)
            return f, sae.decode(f)
    elif library == "sparsify":
        from sparsify import SparseCoder

        coders = SparseCoder.load_many(str(folder / library), local=True)

        def run(path: Path, x):
            sc = coders[path.name]
            enc = sc.encode(x)
            f = torch.zeros(x.shape[0], sc.num_latents).scatter(-1, enc.top_indices, enc.top_acts)
            return f, sc.decode(enc.top_acts, enc.top_indices)
    elif library == "dictionary_learning":
        from dictionary_learning.utils import load_dictionary

        def run(path: Path, x):
            ae, _ = load_dictionary(str(path), "cpu")
            f = ae.encode(x)
            return f, ae.decode(f)
    else:
        raise ValueError(f"unknown library {library!r}")
    worst = 0.0
    with torch.no_grad():
        for name, sub in manifest["written"].items():
            x = ref[f"{name}.x"]
            f, recon = run(folder / library / sub, x)
            df = (f.float() - ref[f"{name}.f"]).abs().max().item()
            dr = (recon.float() - ref[f"{name}.recon"]).abs().max().item()
            worst = max(worst, df, dr)
            f_max = ref[f"{name}.f"].abs().max().item()
            print(f"{name:<8} {sub:<24} {df:17.3g} {dr:19.3g} {f_max:13.4g} "
                  f"{ref[f'{name}.fvu'].item():11.4f}")
    print(f"largest difference: {worst:.3g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--suite", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--data", default="embedded", help="text the inputs come from")
    c = sub.add_parser("check")
    c.add_argument("--dir", required=True)
    c.add_argument("--library", required=True,
                   choices=["saelens", "sparsify", "dictionary_learning"])
    args = p.parse_args()
    if args.cmd == "make":
        make(args.suite, Path(args.out), args.data)
    else:
        check(Path(args.dir), args.library)


if __name__ == "__main__":
    main()
