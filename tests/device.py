"""Device and dtype of the on-device tests (tests/test_on_device.py), from the environment.

SCAE_TEST_DEVICE: "cpu" (default), "cuda", "cuda:1", ...
SCAE_TEST_DTYPE:  "fp32" (default) or "bf16"
A requested device that is not there is an error, not a skip: a GPU check must not pass by
skipping everything.
"""

from __future__ import annotations

import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

TEST_DEVICE = torch.device(os.environ.get("SCAE_TEST_DEVICE", "cpu"))
_dtype_name = os.environ.get("SCAE_TEST_DTYPE", "fp32")
if _dtype_name not in DTYPES:
    raise ValueError(f"SCAE_TEST_DTYPE={_dtype_name!r}: use one of {list(DTYPES)}")
TEST_DTYPE = DTYPES[_dtype_name]
if TEST_DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError(
        f"SCAE_TEST_DEVICE={TEST_DEVICE} but torch.cuda.is_available() is False; install a CUDA "
        f"build of torch or unset SCAE_TEST_DEVICE"
    )

# Relative tolerance of one device result against the float64 CPU reference of the same inputs:
# bf16 keeps 8 bits of mantissa (~0.4 % per rounding), sums and casts add a few roundings.
RTOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2}[TEST_DTYPE]


def assert_close_to_reference(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = RTOL):
    """|got - want| <= rtol * max|want| elementwise (got on the test device, want fp64 on CPU)."""
    got64 = got.detach().to("cpu", torch.float64)
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got64 - want).abs().max()) if want.numel() else 0.0
    assert got.device.type == TEST_DEVICE.type, (
        f"{what}: computed on {got.device}, not {TEST_DEVICE}"
    )
    assert torch.isfinite(got64).all(), f"{what}: non-finite values on {TEST_DEVICE}"
    assert err <= rtol * max(scale, 1e-12), (
        f"{what} on {TEST_DEVICE}/{TEST_DTYPE}: max error {err:.3g} > {rtol} x max|ref| {scale:.3g}"
    )
