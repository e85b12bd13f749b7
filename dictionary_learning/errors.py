"""Errors shared by trainers and the training loop."""

from __future__ import annotations


class NonFiniteLossError(FloatingPointError):
    """A dictionary's loss became NaN/Inf; raised before the optimizer step so weights stay
    clean."""

    def __init__(self, name: str, step: int, value: float):
        self.name, self.step, self.value = name, step, value
        super().__init__(
            f"non-finite loss {value} of {name!r} (a dictionary, or the suite's 'kl') at step "
            f"{step}; the optimizer step "
            "was skipped. Lower the learning rate, check the inputs for NaN/Inf, or resume from "
            "the last checkpoint."
        )


class DataExhaustedError(RuntimeError):
    """The data ran out before a full batch could be formed or training reached its last step."""


class UnsafeFileError(ValueError):
    """A file would need code execution to load (a pickled Python object); it was not loaded."""


class CorruptFileError(ValueError):
    """A file is truncated, empty, or not in the format its name promises."""


class NonFiniteWeightsError(ValueError):
    """A loaded dictionary parameter holds NaN or Inf values."""


class DiskFullError(OSError):
    """A write failed because the file system is full; the target file was left untouched."""
