"""Loading tensor files without running code from them, and checking loaded weights are finite.

Every file the library reads (connections, training checkpoints, suites, dictionary_learning
exports) goes through `load_tensor_file`: `torch.load(weights_only=True)` for torch.save files, and
a restricted unpickler for plain pickles of tensors (the original fork's connections format). Both
build only tensors and plain containers; anything else (a pickled class, a function call) is
refused with `UnsafeFileError` naming the file, before any of it runs.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .errors import CorruptFileError, NonFiniteWeightsError, UnsafeFileError


def _storage_from_bytes(b: bytes):
    # torch's own _load_from_bytes unpickles the storage with weights_only=False: never use it
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


# the only globals a plain pickle of (dicts of) tensors refers to
_PLAIN_PICKLE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): OrderedDict,
}


class _Refused(pickle.UnpicklingError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(name)


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles tensors, dicts, lists, tuples, numbers and strings; refuses every other global."""

    def find_class(self, module: str, name: str):
        try:
            return _PLAIN_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise _Refused(f"persistent id {pid!r}")


def _unsafe(path: Path, what: str, name: str, fix: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"refusing to load {what} {str(path)!r}: it holds a pickled {name}, which only unpickling "
        f"with code execution could build (a file from an old version or another program, or a "
        f"tampered one). Nothing from it was run. {fix}"
    )


def load_tensor_file(path: str | os.PathLike, what: str, fix: str):
    """Load a torch.save file or a plain pickle holding only tensors and plain containers.

    `what` names the kind of file in messages ("connections file"), `fix` says what to do instead.
    Raises FileNotFoundError, UnsafeFileError (a pickled object other than tensors and plain
    containers: nothing of it is executed) or CorruptFileError (empty, truncated, not a pickle).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist. {fix}")
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{what} {str(path)!r} is empty (0 bytes). {fix}")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise CorruptFileError(
            f"{what} {str(path)!r} is a truncated or corrupt torch.save file (its zip directory is "
            f"missing: was the write interrupted or the download cut short?). {fix}"
        )
    if zipfile.is_zipfile(path):  # torch.save's format
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            m = re.search(r"GLOBAL ([\w.]+)", str(exc))
            if m or "Unsupported" in str(exc):
                raise _unsafe(path, what, m.group(1) if m else "object", fix) from None
            raise CorruptFileError(f"{what} {str(path)!r} cannot be read ({exc}). {fix}") from None
        except Exception as exc:  # noqa: BLE001  (torch raises many types for damaged zips)
            raise CorruptFileError(
                f"{what} {str(path)!r} is truncated or corrupt: {str(exc).splitlines()[0]}. {fix}"
            ) from None
    try:  # a plain pickle (the original fork's connections) or torch's legacy format
        with open(path, "rb") as fh:
            return _TensorUnpickler(fh).load()
    except _Refused as exc:
        if not exc.name.startswith("persistent id"):
            raise _unsafe(path, what, exc.name, fix) from None
    except Exception as exc:  # noqa: BLE001  (any failure here means: not a pickle of tensors)
        raise CorruptFileError(
            f"{what} {str(path)!r} is neither a torch.save file nor a pickle of tensors "
            f"({type(exc).__name__}: {exc}). {fix}"
        ) from None
    try:  # torch's pre-1.6 format: persistent ids; its weights_only loader is safe
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        m = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise _unsafe(path, what, m.group(1) if m else "object", fix) from None
    except Exception as exc:  # noqa: BLE001  (damaged legacy file: any error type)
        raise CorruptFileError(f"{what} {str(path)!r} cannot be read ({exc}). {fix}") from None


def check_finite(tensors: Mapping[str, Tensor], where: str, fix: str) -> None:
    """Raise NonFiniteWeightsError naming the first parameter of `tensors` with NaN or Inf values.

    `tensors` maps "<dictionary>.<parameter>" (or any readable name) to a tensor; `where` names
    the file or object they came from.
    """
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t)
        if bad.any():
            n_nan, n_inf = int(t.isnan().sum()), int(t.isinf().sum())
            first = tuple(int(i) for i in bad.nonzero()[0])
            dict_name, _, param = name.partition(".")
            label = (f"dictionary {dict_name!r} parameter {param!r}" if param
                     else f"parameter {name!r}")
            raise NonFiniteWeightsError(
                f"{where}: {label} has {n_nan} NaN and {n_inf} Inf values of {t.numel()} (first at "
                f"index {first}); the file is corrupt or training diverged. {fix}"
            )


def flat_state(dicts: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """{"<dict>.<param>": tensor} of {dict: state_dict}, for `check_finite`."""
    return {f"{n}.{k}": t for n, sd in dicts.items() for k, t in sd.items()}
