"""Shared pieces of the GPU tests: models on the device, reference outputs, error bounds."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BF16_REL = 2e-2
"""bf16 bound: ||out - ref|| / ||ref|| (Frobenius) against sequential eager in bf16. bf16 has an 8-bit
mantissa (~4e-3 relative per rounding); a split changes GEMM shapes and so kernel choice and summation
order, which over a few layers stays well inside 2e-2."""


def to_device(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return model.to(device="cuda", dtype=dtype).eval()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    if dtype == torch.float32:
        # TF32 is off by default for matmuls in torch; a split only changes GEMM shapes
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: {m}")
    else:
        err = rel_err(out, ref)
        assert err <= BF16_REL, f"{what}: bf16 relative error {err:.3g} > {BF16_REL}"
