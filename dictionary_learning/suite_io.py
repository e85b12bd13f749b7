"""Saving and loading a suite of TopK dictionaries (one per attn_<l> / mlp_<l>).

Our layout (a folder): `config.json` {"dictionaries": {name: dict.config()}, "format": ..., plus
meta}, `model.safetensors` with keys `<name>.encoder.weight` etc., and optionally `connections.pt`.

`load_suite` also reads the original SCAE fork's layout (`config.json` with `submodule_configs`, and
`checkpoint.pt` holding `aes.<name>.*`). That fork encoded relu(W (x - b_dec) + b) for SAEs and
transcoders alike; it is converted exactly to our b_enc = b - W b_dec (docs/formats.md §4,
docs/departures.md §1).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

from .names import parse_module_name, suite_order  # noqa: F401  (suite_order re-exported)
from .dictionary import AutoEncoderTopK, TopKDictionary, TopKTranscoder, build_dictionary
from .version import __version__, git_commit
from .errors import CorruptFileError
from .files import atomic_dir
from .safe_load import check_finite, flat_state, load_tensor_file

logger = logging.getLogger(__name__)

FORMAT = "scae-suite"
FORMAT_VERSION = 1
PARAM_KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class SuiteFiles(NamedTuple):
    """What `load_suite` returns."""

    dicts: dict[str, TopKDictionary]
    meta: dict
    connections: dict | None


def check_name(name: str, d: TopKDictionary | None = None) -> tuple[str, int]:
    """Validate a suite name: `attn_<l>` must be an SAE, `mlp_<l>` a transcoder. Returns
    (kind, layer)."""
    kind, layer = parse_module_name(name)
    if d is not None:
        if kind == "attn" and not isinstance(d, AutoEncoderTopK):
            raise TypeError(f"{name!r} must be an AutoEncoderTopK (SAE), got {type(d).__name__}")
        if kind == "mlp" and not isinstance(d, TopKTranscoder):
            raise TypeError(f"{name!r} must be a TopKTranscoder, got {type(d).__name__}")
    return kind, layer


def library_versions() -> dict[str, str]:
    """Versions of the libraries that matter for reproducing a suite."""
    out = {"torch": torch.__version__}
    for mod in ("transformers", "nnsight", "safetensors"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed or broken: record it, don't fail the save
            out[mod] = "unavailable"
    # This code's own version and commit: an installed PyPI `dictionary-learning` must not stand in.
    out["scae"] = __version__
    out["scae_commit"] = git_commit() or "unavailable"
    return out


def save_suite(
    path: str | os.PathLike,
    dicts: dict[str, TopKDictionary],
    meta: dict | None = None,
    connections: dict | None = None,
) -> Path:
    """Write a suite folder atomically (temp dir next to it, then rename). Returns the path."""
    if not dicts:
        raise ValueError("save_suite: `dicts` is empty; pass at least one dictionary")
    meta = dict(meta or {})
    for reserved in ("dictionaries", "format", "format_version"):
        if reserved in meta:
            raise ValueError(f"save_suite: meta key {reserved!r} is reserved; rename it")
    tensors = {}
    for name in suite_order(dicts):
        d = dicts[name]
        check_name(name, d)
        for key, t in d.state_dict().items():
            tensors[f"{name}.{key}"] = t.detach().cpu().contiguous()
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dictionaries": {n: dicts[n].config() for n in suite_order(dicts)},
        "dtype": meta.pop("dtype", None) or (dtypes.pop() if len(dtypes) == 1 else sorted(dtypes)),
        "versions": {**library_versions(), **meta.pop("versions", {})},
        **meta,
    }
    out = Path(path)
    with atomic_dir(out, out / "model.safetensors") as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        if connections is not None:
            torch.save(connections, tmp / "connections.pt")
    return out


def _resolve(path_or_repo_id: str | os.PathLike) -> Path:
    """A local folder, or a Hub snapshot downloaded with the environment's token."""
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_repo_id)
    if p.exists():
        raise NotADirectoryError(f"suite path {s!r} is a file; pass the suite's folder")
    if not _REPO_ID_RE.match(s) or s.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"suite {s!r} is neither an existing folder nor a Hugging Face repo id ('owner/name')"
        )
    no_net = (
        f"cannot download suite {s!r}: there is no network access to the Hugging Face Hub (or "
        "HF_HUB_OFFLINE is set). Download the repo's folder on a machine with network "
        f"(huggingface-cli download {s} --local-dir DIR) and pass its local path."
    )
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ConnectionError(no_net)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(s))  # token from HF_TOKEN / `huggingface-cli login`
    except Exception as exc:
        from huggingface_hub.errors import (
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
        )

        if isinstance(exc, RepositoryNotFoundError):
            raise FileNotFoundError(
                f"Hugging Face repo {s!r} not found (or private: log in with `huggingface-cli "
                "login` or set HF_TOKEN)"
            ) from exc
        if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError)):
            raise ConnectionError(no_net) from exc
        raise


def suite_folder(path_or_repo_id: str | os.PathLike) -> Path:
    """The local folder of a suite: the path itself, or the Hub snapshot of a repo id."""
    return _resolve(path_or_repo_id)


def _check_keys(found: set[str], expected: set[str], where: str) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise KeyError(
            f"{where}: state dict keys do not match the config. missing keys: {missing}; "
            f"unexpected keys: {unexpected}"
        )


def load_suite(
    path_or_repo_id: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SuiteFiles:
    """Load a suite folder (ours or the original fork's layout) or a Hub repo id."""
    root = _resolve(path_or_repo_id)
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{root} has no config.json; is it a suite folder?")
    config = _read_config(cfg_file)
    if "dictionaries" in config and (root / "model.safetensors").is_file():
        dicts = _load_ours(root, config)
        meta = {k: v for k, v in config.items() if k != "dictionaries"}
    elif (root / "checkpoint.pt").is_file():
        dicts = _load_original(root, config)
        meta = {k: v for k, v in config.items() if k not in ("submodule_configs", "connections")}
        meta["source_format"] = "original-scae-fork"
    else:
        raise FileNotFoundError(
            f"{root}: expected model.safetensors (with config 'dictionaries') or checkpoint.pt "
            "(original fork layout); found neither"
        )
    check_finite(
        flat_state({n: d.state_dict() for n, d in dicts.items()}), f"suite {str(root)!r}",
        "Retrain the suite, or load an earlier copy of it.",
    )
    connections = None
    if (root / "connections.pt").is_file():
        connections = load_tensor_file(
            root / "connections.pt", "suite connections file",
            "Delete it to load the suite without connections, or save the suite again.",
        )
    dicts = {n: d.to(device=device, dtype=dtype) for n, d in dicts.items()}
    return SuiteFiles(dicts, meta, connections)


def _read_config(cfg_file: Path) -> dict:
    """config.json as a dict, or a ValueError naming the file (empty, not JSON, not an object)."""
    text = cfg_file.read_bytes()
    if not text.strip():
        raise CorruptFileError(
            f"{str(cfg_file)!r} is empty; the suite folder is incomplete. Save the suite again "
            "(SCAESuite.save_pretrained) or download it again."
        )
    try:
        config = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(
            f"{str(cfg_file)!r} is not valid JSON ({exc}); the suite folder is damaged. Save the "
            "suite again (SCAESuite.save_pretrained) or download it again."
        ) from None
    if not isinstance(config, dict):
        raise CorruptFileError(
            f"{str(cfg_file)!r} holds a JSON {type(config).__name__}, not an object; it is not a "
            "suite config. Pass a folder written by SCAESuite.save_pretrained."
        )
    return config


def _load_ours(root: Path, config: dict) -> dict[str, TopKDictionary]:
    weights = root / "model.safetensors"
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001  (safetensors has its own error types)
        raise CorruptFileError(
            f"{str(weights)!r} is truncated or corrupt ({exc}); was the copy or download cut "
            "short? Save or download the suite again."
        ) from None
    dicts = {}
    for name, dcfg in config["dictionaries"].items():
        d = build_dictionary(dcfg)
        check_name(name, d)
        dicts[name] = d
    expected = {f"{n}.{k}" for n, d in dicts.items() for k in d.state_dict()}
    _check_keys(set(tensors), expected, str(root / "model.safetensors"))
    for name, d in dicts.items():
        sd = {k: tensors[f"{name}.{k}"] for k in d.state_dict()}
        for k, t in sd.items():
            want = tuple(d.state_dict()[k].shape)
            if tuple(t.shape) != want:
                raise ValueError(f"{root}: {name}.{k} has shape {tuple(t.shape)}, expected {want}")
        d.to(dtype=next(iter(sd.values())).dtype)
        d.load_state_dict(sd, strict=True)
    return dicts


def _load_original(root: Path, config: dict) -> dict[str, TopKDictionary]:
    """The original fork: `aes.<name>.{encoder.weight,encoder.bias,decoder.weight,b_dec}`."""
    ckpt = load_tensor_file(
        root / "checkpoint.pt", "suite checkpoint",
        "Pass a suite folder with config.json + model.safetensors, or the original fork's layout.",
    )
    state = ckpt["suite_state"] if isinstance(ckpt, dict) and "suite_state" in ckpt else ckpt
    if not isinstance(state, dict):
        raise TypeError(
            f"{root / 'checkpoint.pt'}: expected a state dict, got {type(state).__name__}"
        )
    if "submodule_configs" in config:
        sub = config["submodule_configs"]
    elif "k" in config and "n_features" in config:  # oldest layout: one k / F for every module
        names = sorted({k.split(".")[1] for k in state if k.startswith("aes.")})
        sub = {n: {"dict_size": config["n_features"], "k": config["k"]} for n in names}
    else:
        raise KeyError(
            f"{root / 'config.json'}: no 'submodule_configs' (original fork layout) and no "
            "'dictionaries' (our layout)"
        )
    expected = {f"aes.{n}.{k}" for n in sub for k in PARAM_KEYS}
    _check_keys(set(state), expected, str(root / "checkpoint.pt"))
    dicts: dict[str, TopKDictionary] = {}
    for name in suite_order(sub):
        c = sub[name]
        W_FD = state[f"aes.{name}.encoder.weight"].double()
        b_F = state[f"aes.{name}.encoder.bias"].double()
        W_dec_DF = state[f"aes.{name}.decoder.weight"]
        b_dec_D = state[f"aes.{name}.b_dec"].double()
        F, D_in = W_FD.shape
        D_out = W_dec_DF.shape[0]
        if tuple(W_dec_DF.shape) != (D_out, F) or b_dec_D.shape != (D_out,) or b_F.shape != (F,):
            raise ValueError(
                f"{root}: {name}: inconsistent shapes encoder.weight {tuple(W_FD.shape)}, "
                f"encoder.bias {tuple(b_F.shape)}, decoder.weight {tuple(W_dec_DF.shape)}, "
                f"b_dec {tuple(b_dec_D.shape)}"
            )
        if "dict_size" in c and int(c["dict_size"]) != F:
            raise ValueError(
                f"{root}: {name}: config dict_size {c['dict_size']} but weights have {F}"
            )
        if D_in != D_out:
            raise ValueError(
                f"{root}: {name}: the fork subtracted b_dec [{D_out}] from a [{D_in}] input"
            )
        kind, _ = check_name(name)
        k = int(c["k"])
        d = AutoEncoderTopK(D_in, F, k) if kind == "attn" else TopKTranscoder(D_in, D_out, F, k)
        with torch.no_grad():
            d.encoder.weight.copy_(W_FD)
            d.encoder.bias.copy_(b_F - W_FD @ b_dec_D)  # relu(W(x - b_dec) + b) = relu(Wx + b')
            d.decoder.weight.copy_(W_dec_DF)
            d.b_dec.copy_(b_dec_D)
        dicts[name] = d
    return dicts
