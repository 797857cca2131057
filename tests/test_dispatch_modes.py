"""dynaflow under a caller's dispatch mode (torch's CUDA sanitizer is one, ``TORCH_CUDA_SANITIZER=1``): the
analysis's fake tensors never reach the caller's mode, and a capture Dynamo skips says why.

The mode here does what the sanitizer does to every tensor argument (on a GPU it reads ``data_ptr()``, which a
fake tensor refuses): it fails on a fake one."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

import dynaflow


class _Strict(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(a, FakeTensor) for a in torch.utils._pytree.tree_leaves((args, kwargs))):
            raise AssertionError(f"a fake tensor reached the caller's dispatch mode in {func}")
        self.ops += 1
        return func(*args, **kwargs)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8), torch.nn.GELU()).eval()


def test_a_traced_graph_is_analysed_without_the_callers_mode_seeing_fake_tensors():
    model = _model()
    x = torch.randn(6, 8)
    mode = _Strict()
    with torch.no_grad(), mode:
        out = dynaflow.compile(torch.fx.symbolic_trace(model), strategy="nanoflow", nano_batches=2,
                               executor="serial")(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    assert mode.ops > 0  # the real ops of the step did go through the caller's mode


def test_a_module_under_a_dispatch_mode_gets_an_error_naming_the_mode():
    torch._dynamo.reset()
    with torch.no_grad(), _Strict(), pytest.raises(dynaflow.CaptureError, match=r"dispatch mode is active \(_Strict"):
        dynaflow.compile(_model(), strategy="nanoflow", nano_batches=2, executor="serial")(torch.randn(6, 8))
