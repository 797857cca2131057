"""Batch rules for ATen's batched math: linear algebra over matrices, distances, bucketing, unpooling, grids.

These ops treat their leading dims as a batch of independent problems (a matrix per row, a point set per
row), so they are row-local when the batch sits in those leading dims; the rules check where the batch is
and that every tensor argument that holds it holds it at the same leading position. Registered when
:mod:`.aten_table` is imported.
"""

from __future__ import annotations

from typing import Mapping

import torch

from dynaflow.frontend.aten_rules import AtenCall, BatchRule, pointwise, register_batch_rule

__all__: list[str] = []


def _leading(call: AtenCall, cores: Mapping[str, int]) -> str | None:
    """Every tensor argument named in ``cores`` (name -> its trailing core dims: 2 for a matrix, 1 for a
    vector) holds the batch, if at all, in its leading dims, at the same position counted from the end of
    them; a batch-free one is size 1 there (broadcast)."""
    where: dict[str, int] = {}
    for name, core in cores.items():
        t = call.args.get(name)
        d = call.dim(name)
        if not isinstance(t, torch.Tensor) or d is None:
            continue
        lead = t.dim() - core
        if d >= lead:
            return f"its argument {name!r} holds the batch in its last {core} (core) dims, at dim {d}"
        where[name] = d - lead
    if len(set(where.values())) > 1:
        return f"its arguments hold the batch at different leading dims ({where})"
    if where:
        at = next(iter(where.values()))
        for name, core in cores.items():
            t = call.args.get(name)
            if isinstance(t, torch.Tensor) and name not in where and t.dim() - core >= -at and t.shape[at - core] != 1:
                return f"its batch-free argument {name!r} {tuple(t.shape)} is not broadcast along the batch dim"
    return None


def _matrices(**cores: int) -> BatchRule:
    return lambda call: _leading(call, cores)


def _solve(call: AtenCall) -> str | None:
    """``linalg.solve(A, B)``: ``B`` is a matrix, or a vector when it has one dim fewer than ``A``."""
    a, b = call.args["A"], call.args["B"]
    return _leading(call, {"A": 2, "B": 1 if b.dim() == a.dim() - 1 else 2})


def _cdist(call: AtenCall) -> str | None:
    """Distances between the rows of ``x1 [..., P, M]`` and ``x2 [..., R, M]``: the batch in the leading dims of
    both, or in the point rows (dim -2) of one while the other is batch-free."""
    d1, d2 = call.dim("x1"), call.dim("x2")
    x1, x2 = call.args["x1"], call.args["x2"]
    if (d1 == x1.dim() - 2 and d2 is None) or (d2 == x2.dim() - 2 and d1 is None):
        return None
    return _leading(call, {"x1": 2, "x2": 2})


def _unpool(spatial: int) -> BatchRule:
    def rule(call: AtenCall) -> str | None:
        if call.dim("self") != call.dim("indices"):
            return "its values and indices hold the batch at different dims"
        return _leading(call, {"self": spatial, "indices": spatial})

    return rule


def _bucketize(call: AtenCall) -> str | None:
    return "its boundaries hold the batch" if call.dim("boundaries") is not None else None


def _searchsorted(call: AtenCall) -> str | None:
    """A 1-D sorted sequence is shared by every element; an N-D one pairs its leading dims with ``self``'s."""
    seq = call.args["sorted_sequence"]
    if seq.dim() == 1:
        return "its sorted sequence holds the batch" if call.dim("sorted_sequence") is not None else None
    return _leading(call, {"sorted_sequence": 1, "self": 1, "sorter": 1})


def _affine_grid(call: AtenCall) -> str | None:
    """One sampling grid per row of ``theta [N, 2, 3]`` (``size[0]`` is ``N``)."""
    if call.dim("theta") not in (None, 0):
        return f"its theta holds the batch at dim {call.dim('theta')}, not at dim 0"
    size = call.args["size"]
    if any(isinstance(s, torch.SymInt) and call.batch in s.node.expr.free_symbols for s in size[1:]):
        return "its grid size holds the batch size outside dim 0"
    return None


def _grid_sample(call: AtenCall) -> str | None:
    """Sampling ``input [N, C, ...]`` at ``grid [N, ..., 2]`` (``N`` equal): the batch at dim 0 of both (a grid
    per sample), or in the channels of the input with a batch-free grid."""
    d_in, d_grid = call.dim("input"), call.dim("grid")
    if (d_in, d_grid) in ((0, 0), (1, None), (None, 0)):
        return None
    return f"it samples with the batch at dim {d_in} of its input and dim {d_grid} of its grid"


_A = "aten::"
for _name in ("linalg_inv_ex", "_linalg_det", "_linalg_svd", "linalg_qr", "_linalg_eigh", "_linalg_slogdet",
              "linalg_lu_factor_ex"):
    register_batch_rule(_A + _name, _matrices(A=2))
for _name in ("linalg_cholesky_ex", "linalg_eig", "matrix_exp", "linalg_matrix_exp"):
    register_batch_rule(_A + _name, _matrices(self=2))
register_batch_rule(_A + "_linalg_solve_ex", _solve)
register_batch_rule(_A + "linalg_solve_triangular", _matrices(self=2, B=2))
register_batch_rule(_A + "triangular_solve", _matrices(self=2, A=2))
register_batch_rule(_A + "cholesky_solve", _matrices(self=2, input2=2))
register_batch_rule(_A + "linalg_lu_solve", _matrices(LU=2, pivots=1, B=2))
register_batch_rule([_A + "_cdist_forward", _A + "_euclidean_dist"], _cdist)  # the latter: p=2 by matmuls
register_batch_rule(_A + "max_unpool2d", _unpool(2))
register_batch_rule(_A + "max_unpool3d", _unpool(3))
register_batch_rule(_A + "bucketize.Tensor", _bucketize)
register_batch_rule(_A + "searchsorted.Tensor", _searchsorted)
register_batch_rule(_A + "affine_grid_generator", _affine_grid, sizes=("size",), makes_batch=True)
register_batch_rule(_A + "log_sigmoid_forward", pointwise)
register_batch_rule([_A + "grid_sampler_2d", _A + "grid_sampler_3d"], _grid_sample)
register_batch_rule(_A + "_linalg_check_errors", lambda c: None)  # raises if any row failed, as the whole would
