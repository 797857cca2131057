"""Every failure is a DynaflowError that names the cause and the fix, or the call equals eager (issue 15,
item 8): RNN modules, a model that fixes the batch size, a raising split_config or rule predicate, bad
wait timeouts, an empty batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynaflow
from dynaflow import knobs
from dynaflow.errors import BatchCouplingError, CaptureError, ConfigError, PartitionError, StrategyError
from dynaflow.frontend.rules import Where
from dynaflow.strategies import Sequential
from models import grad_off, make_mlp, mlp_input


class _Rnn(nn.Module):
    def __init__(self, cls: type[nn.Module]):
        super().__init__()
        self.rnn = cls(8, 8, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_rnn_modules_get_an_error_that_names_them_and_dynamo(cls):
    with grad_off(), pytest.raises(CaptureError) as info:
        dynaflow.compile(_Rnn(cls))(torch.randn(6, 3, 8))
    msg = str(info.value)
    assert f"rnn ({cls.__name__})" in msg and "Dynamo does not trace" in msg and "LSTMCell" in msg
    assert "recompile" not in msg


class _View(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x).view(6, 8)


class _Expand(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) + torch.ones(1, 8).expand(6, 8)


@pytest.mark.parametrize("cls", [_View, _Expand])
def test_a_model_that_fixes_the_batch_size_runs_whole_or_names_the_fix_under_strict(cls):
    model, x = cls(), torch.randn(6, 8)
    with grad_off():
        compiled = dynaflow.compile(model, nano_batches=2)
        torch.testing.assert_close(compiled(x), model(x))
    assert "batch specialised by Dynamo" in compiled.explain()
    torch._dynamo.reset()
    with grad_off(), pytest.raises(BatchCouplingError) as info:
        dynaflow.compile(cls(), nano_batches=2, strict=True)(x)
    msg = str(info.value)
    assert "fixes the batch size" in msg and "size 6" in msg and "x.shape[0]" in msg


class _RaisingSplit(Sequential):
    def split_config(self, info):
        return {}["missing"]


def test_a_split_config_that_raises_gives_a_strategy_error():
    with grad_off(), pytest.raises(StrategyError) as info:
        dynaflow.compile(make_mlp(), strategy=_RaisingSplit())(mlp_input(4))
    assert "split_config" in str(info.value) and "KeyError" in str(info.value)


def test_a_where_predicate_that_raises_gives_a_partition_error():
    def bad(node):
        raise KeyError("boom")

    with grad_off(), pytest.raises(PartitionError) as info:
        dynaflow.compile(make_mlp(), rules=[Where(bad)])(mlp_input(4))
    assert "KeyError" in str(info.value) and "Where" in str(info.value)


@pytest.mark.parametrize("value", ["5", True, [5]])
def test_a_wait_timeout_of_the_wrong_type_is_a_config_error(value):
    with pytest.raises(ConfigError, match="wait_timeout"):
        dynaflow.compile(make_mlp(), config={"wait_timeout": value})


@pytest.mark.parametrize("value", ["abc", "-1", "nan", ""])
def test_a_malformed_wait_timeout_knob_is_a_config_error_naming_it(value):
    compiled = dynaflow.compile(make_mlp(), strategy="round_robin", nano_batches=2, executor="thread")
    with grad_off(), knobs.scope(DYNAFLOW_WAIT_TIMEOUT=value), pytest.raises(ConfigError) as info:
        compiled(mlp_input(4))
    assert "DYNAFLOW_WAIT_TIMEOUT" in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("strategy", ["sequential", "nanoflow", "round_robin"])
def test_an_empty_batch_returns_the_eager_answer(strategy):
    model = make_mlp()
    compiled = dynaflow.compile(model, strategy=strategy)
    x = mlp_input(0)
    with grad_off():
        out = compiled(x)
        assert out.shape == model(x).shape == (0, 8)
        assert compiled.direct_calls == 1 and "1 call(s) ran the model itself" in compiled.explain()
        torch.testing.assert_close(compiled(mlp_input(5)), model(mlp_input(5)))  # and later batches still split


def test_an_empty_batch_on_an_fx_graph_module_returns_the_eager_answer():
    gm = torch.fx.symbolic_trace(make_mlp())
    compiled = dynaflow.compile(gm, strategy="nanoflow")
    with grad_off():
        assert compiled(mlp_input(0)).shape == (0, 8) and compiled.direct_calls == 1


@pytest.mark.parametrize("strategy", ["sequential", "nanoflow"])
def test_a_value_named_self_crosses_segments(strategy):
    """A local named ``self`` (or the node torch's ``reduce_scatter_tensor(scatter_dim=1)`` names so) becomes an fx
    node ``self``; kept as a segment's placeholder name it would shadow the segment forward's own ``self``."""
    w = torch.randn(8, 8)

    def f(x):
        h = torch.relu(x @ w)
        self = h * 3  # noqa: PLW0642 - the point of the test
        return self.sum(0, keepdim=True) + self  # a barrier (a sum over the batch) reading it

    x = torch.randn(4, 8)
    with grad_off():
        assert torch.equal(dynaflow.compile(f, strategy=strategy, nano_batches=2)(x), f(x))
