"""Export/import of SAEs in Sam Marks' dictionary_learning format (`ae.pt` + `config.json`).

That library's AutoEncoderTopK encodes relu(encoder(x - b_dec)); ours encodes relu(W_enc x + b_enc)
(docs/method.md §1, docs/formats.md §5). The conversion is exact:
b_enc_dl = b_enc + W_enc b_dec, b_enc = b_enc_dl - W_enc b_dec.

A transcoder with d_in = d_out is exported the same way, as an AutoEncoderTopK whose input is the
MLP input and whose output is the MLP output: the encoder is linear in x, so subtracting the
output bias b_dec from the input is undone exactly by the same b_enc_dl = b_enc + W_enc b_dec, and
the decoder W_dec f + b_dec is unchanged. With d_in != d_out no AutoEncoderTopK can hold it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .dictionary import AutoEncoderTopK, TopKDictionary, TopKTranscoder
from .files import atomic_dir
from .safe_load import check_finite, load_tensor_file

DL_KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold")


def centered_encoder_bias(ae: TopKDictionary) -> torch.Tensor:
    """b_enc + W_enc b_dec (fp32, CPU): the encoder bias of the libraries that encode
    W_enc (x - b_dec) + b (dictionary_learning, sparsify's SAEs); exact, as the map is linear."""
    # float64 keeps the round trip within one float32 rounding
    W_FD = ae.encoder.weight.detach().double().cpu()
    b_dec_D = ae.b_dec.detach().double().cpu()
    return (ae.encoder.bias.detach().double().cpu() + W_FD @ b_dec_D).float()


def export_dictionary_learning(
    ae: TopKDictionary,
    out_dir: str | os.PathLike,
    *,
    layer: int,
    lm_name: str,
    submodule_name: str,
    ctx_len: int,
    extra_buffer_cfg: dict | None = None,
) -> Path:
    """Write `ae` as dictionary_learning's `ae.pt` + `config.json` into `out_dir` (atomically).

    A transcoder (d_in = d_out) becomes an AutoEncoderTopK reading the MLP input and writing the
    MLP output; its config says so (`"transcoder": true`, buffer `"io": "in_and_out"`).
    """
    if not isinstance(ae, TopKDictionary) or ae.d_in != ae.d_out:
        raise TypeError(
            f"cannot export a {type(ae).__name__} with d_in={getattr(ae, 'd_in', '?')} != "
            f"d_out={getattr(ae, 'd_out', '?')} to dictionary_learning's AutoEncoderTopK format, "
            "which has one activation_dim. Keep it in the suite format (suite_io.save_suite)."
        )
    out = Path(out_dir)
    with torch.no_grad():
        state = {
            "encoder.weight": ae.encoder.weight.detach().float().cpu().clone(),
            "encoder.bias": centered_encoder_bias(ae),
            "decoder.weight": ae.decoder.weight.detach().float().cpu().clone(),
            "b_dec": ae.b_dec.detach().float().cpu().clone(),
            "k": torch.tensor(ae.k, dtype=torch.int64),
            "threshold": torch.tensor(-1.0),
        }
    config = {
        "trainer": {
            "dict_class": "AutoEncoderTopK",
            "activation_dim": ae.d_in,
            "dict_size": ae.dict_size,
            "k": ae.k,
            "layer": layer,
            "lm_name": lm_name,
            "submodule_name": submodule_name,
            "transcoder": ae.is_transcoder,
        },
        "buffer": {"ctx_len": ctx_len, "io": "in_and_out" if ae.is_transcoder else "out",
                   **(extra_buffer_cfg or {})},
    }
    with atomic_dir(out, out / "ae.pt") as tmp:
        torch.save(state, tmp / "ae.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out


def load_dictionary_learning(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    *, transcoder: bool = False,
) -> TopKDictionary:
    """Load a dictionary_learning AutoEncoderTopK folder (or its `ae.pt`) into our convention;
    `transcoder=True` returns it as a TopKTranscoder (d_in = d_out)."""
    p = Path(path)
    ae_file = p / "ae.pt" if p.is_dir() else p
    if not ae_file.is_file():
        raise FileNotFoundError(f"no dictionary_learning ae.pt at {str(ae_file)!r}")
    state = load_tensor_file(
        ae_file, "dictionary_learning ae.pt",
        "Pass a folder written by dictionary_learning's AutoEncoderTopK (ae.pt + config.json).",
    )
    if not isinstance(state, dict):
        raise TypeError(
            f"{ae_file}: holds a {type(state).__name__}, not a dictionary_learning state dict"
        )
    missing = [k for k in DL_KEYS if k not in state and k != "threshold"]
    unexpected = [k for k in state if k not in DL_KEYS]
    if missing or unexpected:
        raise KeyError(
            f"{ae_file}: not a dictionary_learning AutoEncoderTopK state dict; missing keys "
            f"{missing}, unexpected keys {unexpected}"
        )
    thr = float(state.get("threshold", torch.tensor(-1.0)))
    if thr >= 0:
        raise ValueError(
            f"{ae_file}: threshold={thr} is set (inference-time JumpReLU threshold); our TopK "
            "dictionaries do not support it. Use the TopK encoding (threshold -1)."
        )
    check_finite(
        {f"ae.{k}": state[k] for k in DL_KEYS if k in state},
        f"dictionary_learning file {str(ae_file)!r}",
        "Retrain the dictionary, or load an earlier copy of it.",
    )
    W_FD = state["encoder.weight"].float()
    F, D = W_FD.shape
    W_dec_DF = state["decoder.weight"].float()
    if tuple(W_dec_DF.shape) != (D, F):
        raise ValueError(
            f"{ae_file}: decoder.weight has shape {tuple(W_dec_DF.shape)}, expected {(D, F)}"
        )
    k = int(state["k"])
    ae = TopKTranscoder(D, D, F, k) if transcoder else AutoEncoderTopK(D, F, k)
    with torch.no_grad():
        b_dec_D = state["b_dec"].float()
        ae.encoder.weight.copy_(W_FD)
        ae.encoder.bias.copy_(
            (state["encoder.bias"].double() - W_FD.double() @ b_dec_D.double()).float()
        )
        ae.decoder.weight.copy_(W_dec_DF)
        ae.b_dec.copy_(b_dec_D)
    return ae.to(device=device, dtype=dtype)
