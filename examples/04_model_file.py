"""A model file for ``dynaflow explain`` and ``dynaflow bench``: ``example()`` returns the model and one batch.

    dynaflow explain examples/04_model_file.py --strategy round_robin
    dynaflow bench examples/04_model_file.py --strategy sequential --nano-batches 1
"""

import torch


class Block(torch.nn.Module):
    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def example():
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(), Block()).eval()
    return model, (torch.randn(8, 16, 128),)
