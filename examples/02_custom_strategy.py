"""A custom strategy in a dozen lines, DynaFlow style: an imperative ``schedule(ctx)`` that is recorded
once per input bucket into a static Schedule (it does not run per step).

    python examples/02_custom_strategy.py
"""

import torch

import dynaflow
from dynaflow.models import TinyTransformer


@dynaflow.register_strategy("ping_pong")
class PingPong(dynaflow.Strategy):
    """Alternate nano-batches between two lanes, one op at a time."""

    default_nano_batches = 2

    def lanes(self, graph):
        return [dynaflow.Lane("ping"), dynaflow.Lane("pong")]

    async def schedule(self, ctx):
        while not ctx.done():
            for nb in range(ctx.num_nano_batches):
                op = ctx.pop(nb)
                if op is not None:
                    await ctx.execute(op, lane="ping" if nb % 2 == 0 else "pong")


model = TinyTransformer(layers=2).eval()
ids = torch.randint(0, 256, (4, 16))
fast = dynaflow.compile(model, strategy="ping_pong")
with torch.no_grad():
    assert torch.equal(fast(ids), model(ids))
print(fast.explain())
