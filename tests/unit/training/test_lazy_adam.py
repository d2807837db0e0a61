"""LazyAdam is torch's SparseAdam, bit for bit, by row gathers instead of sparse algebra."""

from __future__ import annotations

import pytest
import torch

from training.models.lazy_adam import LazyAdam


def _grad(rows: list[int], values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([rows], dtype=torch.long), values, shape, check_invariants=True)


def test_the_same_values_as_sparse_adam_over_steps_with_repeated_rows_and_an_empty_gradient() -> None:
    torch.manual_seed(0)
    start = torch.randn(12, 3)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    optimizers = (
        LazyAdam([ours], lr=0.05, betas=(0.8, 0.99)),
        torch.optim.SparseAdam([theirs], lr=0.05, betas=(0.8, 0.99)),
    )
    steps = [[0, 3, 3, 7], [3], [], [11, 0, 5, 5, 5], [2, 3]]  # duplicates: summed by coalesce
    for rows in steps:
        values = torch.randn(len(rows), 3)
        for param, optimizer in zip((ours, theirs), optimizers):
            param.grad = _grad(rows, values, (12, 3))
            optimizer.step()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    untouched = [r for r in range(12) if all(r not in s for s in steps)]
    torch.testing.assert_close(ours.detach()[untouched], start[untouched], rtol=0, atol=0)
    assert optimizers[0].state[ours]["step"] == len(steps)


def test_a_row_skipped_by_a_step_keeps_its_value_and_moments() -> None:
    # Lazy: row 0 gets a gradient at step 1 only; step 2 (row 1 only) leaves row 0 alone, where
    # dense Adam would move it again by its momentum.
    param = torch.nn.Parameter(torch.zeros(2, 1))
    optimizer = LazyAdam([param], lr=0.1)
    param.grad = _grad([0], torch.tensor([[1.0]]), (2, 1))
    optimizer.step()
    after_one = param.detach().clone()
    assert after_one[0, 0] == pytest.approx(-0.1)  # Adam's first step: -lr * sign(grad)
    param.grad = _grad([1], torch.tensor([[2.0]]), (2, 1))
    optimizer.step()
    assert param.detach()[0, 0] == after_one[0, 0]
    assert param.detach()[1, 0] < 0


def test_dense_gradients_and_bad_settings_are_refused() -> None:
    param = torch.nn.Parameter(torch.zeros(2, 1))
    param.grad = torch.ones(2, 1)
    with pytest.raises(RuntimeError, match="sparse gradients only"):
        LazyAdam([param]).step()
    param.grad = torch.ones(2, 1).to_sparse(sparse_dim=2)  # sparse in both dimensions: no rows to update
    with pytest.raises(RuntimeError, match="sparse gradients only"):
        LazyAdam([param]).step()
    with pytest.raises(ValueError, match="lr > 0"):
        LazyAdam([param], lr=0.0)
