"""Row gathers for the training hot paths: ``table[ids]`` with a cheaper forward and backward on the CPU.

Advanced indexing (``table[ids]``) gathers rows several times slower than ``index_select`` on the CPU,
more so for ids of two or more dimensions; its backward (an accumulating ``index_put``) is in turn
cheaper than ``index_select``'s (``index_add``) once there are many ids. ``gather_rows`` takes the
cheaper of each: the same values and the same gradients (sums of the same terms).
"""

from __future__ import annotations

import torch

LARGE_GATHER = 16_384  # ids from which the accumulating index_put backward beats index_add


class _SelectRows(torch.autograd.Function):
    """index_select forward, accumulating index_put backward."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.rows = table.shape[0]
        return table.index_select(0, ids)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        out = grad.new_zeros((ctx.rows,) + tuple(grad.shape[1:]))
        return out.index_put_((ids,), grad, accumulate=True), None


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``table[ids]`` for int ids of any shape (negative ids wrap, as in indexing) → (*ids.shape, *row)."""
    flat = ids.reshape(-1)
    flat = torch.where(flat < 0, flat + table.shape[0], flat)
    if len(flat) >= LARGE_GATHER and table.requires_grad and torch.is_grad_enabled():
        rows = _SelectRows.apply(table, flat)
    else:
        rows = table.index_select(0, flat)
    return rows.view(*ids.shape, *table.shape[1:])


__all__ = ["gather_rows"]
