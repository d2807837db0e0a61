"""The sequence model: serving's ONNX Runtime encoder equals PyTorch's outputs, training learns an order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.interactions import Encoded, Histories
from training.models.sequence import (
    Dropout,
    SASRec,
    SequenceConfig,
    export,
    full_softmax_loss,
    left_padded,
    sampled_softmax_loss,
    train_sequence_model,
)
from twostage_rec.sequence_encoder import SequenceEncoder


def _histories(sequences: list[list[int]]) -> Histories:
    users = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
    items = np.concatenate([np.array(s) for s in sequences])
    times = np.concatenate([np.arange(len(s)) for s in sequences])
    return Histories.of(Encoded(users, items, np.ones(len(items), np.float32), times), len(sequences))


# The block options: (feed_forward, ff_multiplier, gated_residual); SASRec's ReLU block first.
BLOCKS = [("relu", 1, False), ("swiglu", 2, False), ("relu", 1, True), ("swiglu", 3, True)]


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize(("n_blocks", "n_heads"), [(2, 1), (1, 2), (3, 4)])
def test_serving_encoder_matches_pytorch_within_1e_4(n_blocks: int, n_heads: int, block: tuple[str, int, bool]) -> None:
    torch.manual_seed(n_blocks)
    feed_forward, multiplier, gated = block
    config = SequenceConfig(dim=16, n_blocks=n_blocks, n_heads=n_heads, max_length=8, dropout=0.3,
                            feed_forward=feed_forward, ff_multiplier=multiplier, gated_residual=gated)
    model = SASRec(30, config).eval()
    with torch.no_grad():  # random non-trivial weights everywhere, layer norms included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    graph, spec, item_vectors = export(model, config)
    encoder = SequenceEncoder(graph, spec, item_vectors)
    rng = np.random.default_rng(0)
    histories = [rng.integers(0, 30, n) for n in (1, 2, 5, 8, 13, 40)]  # shorter and longer than max_length
    with torch.no_grad():
        want = model.user_vectors(torch.from_numpy(left_padded(histories, 8))).numpy()
    got = encoder.encode(histories)
    assert got.shape == (6, 16)
    assert np.abs(got - want).max() < 1e-4
    # A batch is the same as one history at a time (padding slots contribute nothing).
    for h, row in zip(histories, got):
        assert np.abs(encoder.encode([h])[0] - row).max() < 1e-4
    with pytest.raises(ValueError, match="at least one item"):
        encoder.encode([np.array([], dtype=np.int64)])


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize(("n_blocks", "n_heads"), [(1, 1), (2, 2), (3, 4)])
def test_the_last_slot_path_equals_the_full_forward_at_the_last_slot(
    n_blocks: int, n_heads: int, block: tuple[str, int, bool]
) -> None:
    torch.manual_seed(7)
    feed_forward, multiplier, gated = block
    config = SequenceConfig(dim=16, n_blocks=n_blocks, n_heads=n_heads, max_length=8,
                            feed_forward=feed_forward, ff_multiplier=multiplier, gated_residual=gated)
    model = SASRec(30, config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        seq = torch.from_numpy(left_padded([np.array([3]), np.arange(1, 6), np.arange(20)], 8))
        embedded, valid = model.item_embedding(seq), seq > 0
        got = model.encode_last(embedded, valid)
        want = model.encode(embedded, valid)[:, -1]
    assert got.shape == (3, 16)
    # The same sums in another order: a few float32 ulps apart (one ulp at 2 is 2.4e-7).
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_targets", [1, 127, 128, 300])  # one chunk, a full one, several and a partial
def test_chunked_full_softmax_equals_cross_entropy_in_loss_and_both_gradients(n_targets: int) -> None:
    torch.manual_seed(n_targets)
    hidden = (torch.randn(n_targets, 8) * 2).requires_grad_()
    items = torch.randn(50, 8).requires_grad_()
    target = torch.randint(50, (n_targets,))
    want = torch.nn.functional.cross_entropy(hidden @ items.T, target)
    (want * 3).backward()  # a scaled loss, as the distributed path uses
    want_grads = hidden.grad.clone(), items.grad.clone()
    hidden.grad = items.grad = None
    got = full_softmax_loss(hidden, target, items)
    (got * 3).backward()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(hidden.grad, want_grads[0], atol=1e-6)
    assert torch.allclose(items.grad, want_grads[1], atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("n_targets", [1, 200])
def test_chunked_sampled_softmax_equals_its_autograd_definition(n_targets: int, sparse: bool) -> None:
    torch.manual_seed(n_targets)
    hidden = (torch.randn(n_targets, 8) * 2).requires_grad_()
    items = torch.randn(50, 8).requires_grad_()
    target = torch.randint(50, (n_targets,))
    # repeated negatives and accidental hits (a negative equal to a row's target) included
    negatives = torch.cat([target[:3], torch.tensor([7, 7]), torch.randint(50, (20,))])
    positive = (hidden * items[target]).sum(dim=1, keepdim=True)
    negative = (hidden @ items[negatives].T).masked_fill(negatives[None, :] == target[:, None], float("-inf"))
    logits = torch.cat([positive, negative], dim=1)
    want = torch.nn.functional.cross_entropy(logits, torch.zeros(n_targets, dtype=torch.long))
    (want * 3).backward()
    want_grads = hidden.grad.clone(), items.grad.clone()
    hidden.grad = items.grad = None
    got = sampled_softmax_loss(hidden, target, items, negatives, sparse)
    (got * 3).backward()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(hidden.grad, want_grads[0], atol=1e-6)
    assert items.grad.is_sparse == sparse
    grad = items.grad.to_dense() if sparse else items.grad
    assert torch.allclose(grad, want_grads[1], atol=1e-6)
    if sparse:  # the rows it holds are the targets and the negatives, nothing else
        held = set(items.grad.coalesce().indices()[0].tolist())
        assert held == set(target.tolist()) | set(negatives.tolist())


@pytest.mark.parametrize("block", [BLOCKS[0], BLOCKS[-1]])
def test_training_learns_a_deterministic_next_item_and_is_seeded(block: tuple[str, int, bool]) -> None:
    # Every user walks the cycle 0 -> 1 -> ... -> 9 -> 0 from a different start: the next item is
    # fully determined by the last one.
    sequences = [[(start + step) % 10 for step in range(12)] for start in range(40)]
    feed_forward, multiplier, gated = block
    config = SequenceConfig(
        dim=16, n_blocks=1, max_length=6, epochs=25, batch_size=16, lr=1e-2, dropout=0.0, show_progress=False,
        feed_forward=feed_forward, ff_multiplier=multiplier, gated_residual=gated,
    )
    first = train_sequence_model(_histories(sequences), 10, config)
    encoder = SequenceEncoder(first.graph, first.spec, first.item_vectors)
    probe = [np.array([3, 4, 5]), np.array([7, 8])]
    scores = encoder.encode(probe) @ first.item_vectors.T
    assert scores.argmax(axis=1).tolist() == [6, 9]
    again = train_sequence_model(_histories(sequences), 10, config)
    for a, b in zip(first.model.parameters(), again.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert first.best_epoch == 25 and len(first.history) == 25


def test_the_sampled_softmax_path_updates_only_the_rows_a_step_touches_and_still_learns() -> None:
    # Above full_softmax_max_items the item table is sparse and SparseAdam updates the rows of the
    # step's inputs, targets and negatives only (lazy Adam). One window [1, 2, 3] (table rows 2, 3,
    # 4: row 0 is the padding) with one negative a step: step 1 moves those rows and its negative;
    # step 2 moves them and its own negative, and leaves step 1's negative where step 1 put it
    # (dense Adam would move it again, by its momentum).
    # SASRec's ReLU block: the random draws after the init depend on how many weights it has.
    config = SequenceConfig(dim=8, n_blocks=1, max_length=4, epochs=1, batch_size=1, dropout=0.0,
                            feed_forward="relu", ff_multiplier=1,
                            full_softmax_max_items=5, sampled_negatives=1, show_progress=False)
    torch.manual_seed(config.seed)
    start = SASRec(40, config, sparse=True).item_embedding.weight.detach().clone()
    first, second = (int(torch.randint(1, 41, (1,))) for _ in range(2))  # the steps' draws, after the init
    assert first not in (2, 3, 4, second)  # the seed gives a draw that shows the difference
    one, two = (train_sequence_model(_histories([[1, 2, 3]]), 40, config, fixed_epochs=n) for n in (1, 2))
    assert one.model.sparse and one.model.item_embedding.sparse
    after_one, after_two = one.model.item_embedding.weight.detach(), two.model.item_embedding.weight.detach()

    def moved(table: torch.Tensor, before: torch.Tensor) -> set[int]:
        return set(((table - before).abs().sum(dim=1) > 0).nonzero()[:, 0].tolist())

    assert moved(after_one, start) == {2, 3, 4, first}
    assert moved(after_two, after_one) == {2, 3, 4, second}

    # It still learns the cycle of the full-softmax test, on 10 items with 5 sampled negatives.
    sequences = [[(s + k) % 10 for k in range(12)] for s in range(40)]
    config = SequenceConfig(dim=16, n_blocks=1, max_length=6, epochs=25, batch_size=16, lr=1e-2, dropout=0.0,
                            full_softmax_max_items=5, sampled_negatives=5, show_progress=False)
    result = train_sequence_model(_histories(sequences), 10, config)
    assert result.model.sparse
    encoder = SequenceEncoder(result.graph, result.spec, result.item_vectors)
    scores = encoder.encode([np.array([3, 4, 5]), np.array([7, 8])]) @ result.item_vectors.T
    assert scores.argmax(axis=1).tolist() == [6, 9]


def test_the_block_options_shape_the_layers_and_bad_ones_are_refused() -> None:
    plain = SASRec(5, SequenceConfig(dim=8, n_blocks=1, feed_forward="relu", ff_multiplier=1)).blocks[0]
    gated = SASRec(5, SequenceConfig(dim=8, n_blocks=1, feed_forward="swiglu", ff_multiplier=4, gated_residual=True))
    block = gated.blocks[0]
    assert (plain.feed_forward.ff1.out_features, len(plain.gates)) == (8, 0)
    # SwiGLU: one matrix for the gate and up projections (2 x 8 x 4 rows), 32 hidden units down
    assert (block.feed_forward.ff1.out_features, block.feed_forward.ff2.in_features, len(block.gates)) == (64, 32, 2)
    with pytest.raises(ValueError, match="feed_forward"):
        SequenceConfig(feed_forward="gelu")
    with pytest.raises(ValueError, match="ff_multiplier"):
        SequenceConfig(ff_multiplier=0)


def test_the_cosine_schedule_falls_from_lr_to_zero_over_the_steps() -> None:
    from training.models.sequence import _schedules

    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=0.4)
    assert _schedules([optimizer], "constant", 4) == []
    (schedule,) = _schedules([optimizer], "cosine", 4)
    seen = []
    for _ in range(5):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([0.4, 0.4 * (1 + 2**-0.5) / 2, 0.2, 0.4 * (1 - 2**-0.5) / 2, 0.0])
    with pytest.raises(ValueError, match="lr_schedule"):
        SequenceConfig(lr_schedule="step")


def test_early_stopping_keeps_the_best_epoch() -> None:
    sequences = [[(s + k) % 7 for k in range(9)] for s in range(20)]
    scores = iter([0.1, 0.3, 0.2, 0.25, 0.2, 0.1, 0.0, 0.0])
    config = SequenceConfig(dim=8, n_blocks=1, max_length=4, epochs=8, patience=2, show_progress=False)
    result = train_sequence_model(_histories(sequences), 7, config, validate=lambda model: next(scores))
    assert result.best_epoch == 2 and len(result.history) == 4
    with pytest.raises(ValueError, match="two or more"):
        train_sequence_model(_histories([[1], [2]]), 7, config)


def test_windows_cut_each_history_from_its_end_and_pad_to_the_batch() -> None:
    from training.models.sequence import _windows

    # max_length 3: windows of up to 4 items, newest first; recent_targets 5 covers items[-5:].
    histories = _histories([[1, 2, 3, 4, 5, 6, 7], [8], [], [9, 10]])
    windows = _windows(histories, max_length=3, recent_targets=5)
    got = [windows.items[a : a + n].tolist() for a, n in zip(windows.start, windows.length)]
    # user 0: targets 3..7 -> windows ending at 7 (4 items) and at 4 (items 2,3,4: target 3 is the first)
    assert got == [[4, 5, 6, 7], [2, 3, 4], [9, 10]]
    padded = windows.padded(np.array([2, 1]))
    assert padded.tolist() == [[0, 10, 11], [3, 4, 5]]  # item + 1, left-padded to the longest


def test_a_batch_splits_into_groups_padded_to_their_own_longest_window() -> None:
    from training.models.sequence import _width_groups

    # 127 windows of 2 items and one of 51: one group costs 128 x 51 positions, two cost 127 x 2 + 51.
    length = np.array([2] * 60 + [51] + [2] * 67)
    groups = _width_groups(length)
    assert [sorted(length[g].tolist()) for g in groups] == [[2] * 127, [51]]
    assert sorted(np.concatenate(groups).tolist()) == list(range(128))  # every window once
    # Equal lengths, or splits that save fewer positions than a group costs: one group.
    assert len(_width_groups(np.full(128, 51))) == 1
    assert len(_width_groups(np.array([50, 51, 49, 51]))) == 1
    # Never more than four groups, however varied the lengths.
    varied = _width_groups(np.arange(2, 130))
    assert len(varied) == 4 and sorted(np.concatenate(varied).tolist()) == list(range(128))


def test_dropout_keeps_each_value_with_probability_1_minus_p_scaled_and_is_off_in_eval() -> None:
    torch.manual_seed(0)
    layer = Dropout(0.2)
    x = torch.ones(200_000)
    y = layer(x)
    kept = y > 0
    assert 0.79 < kept.float().mean().item() < 0.81
    torch.testing.assert_close(y[kept], torch.full((int(kept.sum()),), 1 / 0.8))
    assert abs(y.mean().item() - 1.0) < 0.01  # the expectation is unchanged
    x.requires_grad_(True)
    layer(x).sum().backward()  # the gradient flows through the kept values only, scaled
    assert torch.unique(x.grad).tolist() == pytest.approx([0.0, 1 / 0.8])
    layer.eval()
    assert layer(x) is x
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.0)
