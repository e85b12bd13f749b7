"""Export a suite to the files that SAELens, sparsify and dictionary_learning load.

    python export.py --suite DIR --format saelens --out DIR
    python export.py --suite DIR --format sparsify --out DIR
    python export.py --suite DIR --format dictionary_learning --out DIR

or, from Python, `export_suite("runs/x/suite", "out/", "sparsify")`. Every format reproduces the
suite's features and reconstructions (our encoder is relu(W_enc x + b_enc), docs/method.md §1):

- saelens: per attention SAE a folder `blocks.L.hook_attn_out` with `cfg.json` (architecture
  "topk", apply_b_dec_to_input false, so b_enc is ours unchanged) and `sae_weights.safetensors`
  (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec), read by `SAE.load_from_disk`. SAELens
  has no TopK transcoder (its "transcoder" is ReLU, "jumprelu_transcoder" thresholded), so the
  transcoders are skipped with that reason: export them with the sparsify format.
- sparsify: per hookpoint of the Hugging Face base model (GPT-2 `h.L.attn`, `h.L.mlp`; other
  families their own module names, `Architecture.hookpoint`) a folder with
  `cfg.json` and `sae.safetensors` (encoder.weight [F, d_in], encoder.bias, W_dec [F, d_out],
  b_dec), read by `SparseCoder.load_from_disk` and `load_many`. Transcoders have transcode=True
  (no b_dec subtracted); an SAE's encoder bias becomes b_enc + W_enc b_dec, because sparsify
  encodes W_enc (x - b_dec).
- dictionary_learning: per dictionary a folder `<name>` with `ae.pt` + `config.json`
  (AutoEncoderTopK, `dl_format.export_dictionary_learning`), transcoders included (d_in = d_out).

The suite's transcoders read the MLP input with the MLP-input norm's weight (and bias) folded into
the MLP's input projections (`dictionary_learning.model.load_model` folds it): feed them that, not
the unfolded norm's output. A Gemma-2 transcoder maps the MLP's input to the post-feedforward
norm's output, two different modules, which sparsify's one-hookpoint transcoders cannot express:
it is skipped there with that reason.
Each export also writes `export.json`: what was written where, and what was skipped and why.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from dictionary_learning.arch import Architecture, SuiteArch, architecture_of_suite
from dictionary_learning.dictionary import TopKDictionary
from dictionary_learning.dl_format import centered_encoder_bias, export_dictionary_learning
from dictionary_learning.names import parse_module_name, suite_order
from dictionary_learning.files import atomic_dir
from dictionary_learning.suite_io import load_suite

logger = logging.getLogger("export")

FORMATS = ("saelens", "sparsify", "dictionary_learning")
SAELENS_VERSION = "6.54.12"
"""The SAELens release whose disk format is written (and verified, README "Export")."""
NO_SAELENS_TRANSCODER = (
    "SAELens has no TopK transcoder architecture (its 'transcoder' is ReLU, 'jumprelu_transcoder' "
    "thresholded), so none reproduces this transcoder; export it with --format sparsify "
    "(transcode=True), which loads with sparsify's SparseCoder.load_from_disk"
)


class Exported(NamedTuple):
    """What `export_suite` did: module name -> folder written, module name -> reason skipped."""

    out_dir: Path
    written: dict[str, Path]
    skipped: dict[str, str]


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu().contiguous().clone()


def saelens_folder(d: TopKDictionary, out: Path, layer: int, model_name: str, ctx_len: int) -> None:
    """An attention SAE in SAELens' native disk format (architecture "topk")."""
    cfg = {
        "d_in": d.d_in, "d_sae": d.dict_size, "dtype": "float32", "device": "cpu",
        # our encoder never subtracts b_dec: with this off, SAELens computes x W_enc + b_enc too
        "apply_b_dec_to_input": False,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION,
            "model_name": model_name, "hook_name": f"blocks.{layer}.hook_attn_out",
            "hook_head_index": None, "prepend_bos": True, "context_size": ctx_len,
        },
        "k": d.k, "rescale_acts_by_decoder_norm": False, "architecture": "topk",
    }
    out.mkdir(parents=True)
    save_file({"W_enc": _f32(d.encoder.weight.T), "b_enc": _f32(d.encoder.bias),
               "W_dec": _f32(d.decoder.weight.T), "b_dec": _f32(d.b_dec)},
              str(out / "sae_weights.safetensors"))
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2))


def sparsify_folder(d: TopKDictionary, out: Path) -> None:
    """An SAE or transcoder in sparsify's SparseCoder layout (cfg.json + sae.safetensors)."""
    bias_F = d.encoder.bias if d.is_transcoder else centered_encoder_bias(d)
    cfg = {
        "activation": "topk", "expansion_factor": max(1, d.dict_size // d.d_in),
        "normalize_decoder": True, "num_latents": d.dict_size, "k": d.k, "multi_topk": False,
        "skip_connection": False, "transcode": d.is_transcoder, "d_in": d.d_in,
    }
    out.mkdir(parents=True)
    save_file({"encoder.weight": _f32(d.encoder.weight), "encoder.bias": _f32(bias_F),
               "W_dec": _f32(d.decoder.weight.T), "b_dec": _f32(d.b_dec)},
              str(out / "sae.safetensors"))
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2))


def export_one(
    d: TopKDictionary, name: str, fmt: str, root: Path, model_name: str, ctx_len: int,
    arch: Architecture | None = None,
) -> tuple[str, str | None]:
    """Write dictionary `name` under `root` in `fmt`: (its folder name, None), or
    ("", the reason) when that format cannot hold it. `arch` names the model's modules (default:
    GPT-2's)."""
    kind, layer = parse_module_name(name)
    arch = arch or architecture_of_suite(SuiteArch())
    hf_module = arch.hookpoint(kind, layer)
    if fmt == "saelens":
        if d.is_transcoder:
            return "", NO_SAELENS_TRANSCODER
        folder = f"blocks.{layer}.hook_attn_out"
        saelens_folder(d, root / folder, layer, model_name, ctx_len)
        return folder, None
    if d.d_in != d.d_out:
        what = "sparsify's SparseCoder" if fmt == "sparsify" else "AutoEncoderTopK"
        return "", f"d_in={d.d_in} != d_out={d.d_out}: {what} has one width for input and output"
    if fmt == "sparsify":
        if d.is_transcoder and arch.mlp_post_norm is not None:
            return "", (f"a {arch.family} transcoder reads {arch.mlp}'s input but reconstructs "
                        f"{arch.mlp_post_norm}'s output; a sparsify transcoder has one hookpoint "
                        "for both: use --format dictionary_learning")
        sparsify_folder(d, root / hf_module)
        return hf_module, None
    export_dictionary_learning(d, root / name, layer=layer, lm_name=model_name,
                               submodule_name=f"{arch.base_model}.{hf_module}",
                               ctx_len=ctx_len)
    return name, None


def export_suite(
    suite,
    out_dir: str | os.PathLike,
    fmt: str,
    *,
    model_name: str | None = None,
    ctx_len: int | None = None,
) -> Exported:
    """Write every dictionary of `suite` (a suite folder, Hub id, or an object with `.dicts` and
    `.meta` such as SCAESuite) in format `fmt` into `out_dir`, replacing it atomically.

    `model_name` and `ctx_len` default to the suite's meta (`model_name`, `buffer.ctx_len`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {FORMATS}")
    if isinstance(suite, (str, os.PathLike)):
        files = load_suite(suite)
        dicts, meta = files.dicts, files.meta
        suite_arch = SuiteArch.from_meta(meta)
    else:
        dicts, meta = dict(suite.dicts.items()), dict(getattr(suite, "meta", {}) or {})
        suite_arch = getattr(suite, "arch", None) or SuiteArch.from_meta(meta)
    arch = architecture_of_suite(suite_arch)
    model_name = model_name or meta.get("model_name")
    if not model_name:
        raise ValueError(
            "the suite does not record its model (meta 'model_name'); pass model_name= "
            "(--model-name), e.g. 'gpt2'"
        )
    ctx_len = int(ctx_len or (meta.get("buffer") or {}).get("ctx_len") or 128)
    out = Path(out_dir)
    written: dict[str, str] = {}
    skipped: dict[str, str] = {}
    with atomic_dir(out, out / "export.json") as tmp:
        for name in suite_order(dicts):
            folder, why = export_one(dicts[name], name, fmt, tmp, model_name, ctx_len, arch)
            if why is None:
                written[name] = folder
            else:
                skipped[name] = why
        manifest = {"format": fmt, "model_name": model_name, "ctx_len": ctx_len,
                    "architecture": suite_arch.to_meta(), "written": written, "skipped": skipped}
        if fmt == "saelens":
            manifest["saelens_version"] = SAELENS_VERSION
        (tmp / "export.json").write_text(json.dumps(manifest, indent=2))
    for name, why in skipped.items():
        logger.warning("%s not exported to %s: %s", name, fmt, why)
    return Exported(out, {n: out / f for n, f in written.items()}, skipped)


def main(argv: list[str] | None = None) -> Exported:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True, help="suite folder (or Hub id)")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    p.add_argument("--out", required=True, help="output folder (replaced)")
    p.add_argument("--model-name", help="model the suite was trained on (default: suite meta)")
    p.add_argument("--ctx-len", type=int, help="context length (default: suite meta, else 128)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = export_suite(args.suite, args.out, args.fmt, model_name=args.model_name,
                       ctx_len=args.ctx_len)
    print(f"wrote {len(res.written)} {args.fmt} folder(s) to {res.out_dir}; "
          f"skipped {len(res.skipped)}" + "".join(f"\n  {n}: {w}" for n, w in res.skipped.items()))
    return res


if __name__ == "__main__":
    main()
