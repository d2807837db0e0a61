"""The sequence model's training step: the chunked softmax losses and fused Adam against what they replaced.

    python -m bench.sequence_training [--targets 6400] [--items 3706] [--sampled-items 60000] [--repeats 10]

Times, on one torch thread, with random tensors of the training step's shapes (ML-1M's by default:
128 windows of 50 targets, 64 dims, 3,706 items; the sampled case a 60,000-item catalog with
2,048 shared negatives, the synthetic 3M-interaction shape):

- the full softmax loss and its backward pass: autograd over ``F.cross_entropy(hidden @ items.T)``
  against :func:`training.models.sequence.full_softmax_loss`;
- the sampled softmax loss and its backward pass: autograd over the concatenated logits (the
  definition) against :func:`training.models.sequence.sampled_softmax_loss`;
- one Adam step over a (sampled items + 1) x 64 embedding and the blocks' small matrices:
  ``torch.optim.Adam`` unfused against ``fused=True``.

Each pair is checked for equal results first (loss and gradients; the parameters after a step)
and reported as medians and p99 in ms with the ratio, measured in one run. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, Final

from bench.stats import time_calls

WARMUP: Final = 2
DIM: Final = 64
NEGATIVES: Final = 2048


def measure(n_targets: int, n_items: int, n_sampled_items: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """The three comparisons; each entry has ``before_ms``/``after_ms`` summaries, ``ratio``
    (median before / median after) and ``max_abs_diff`` between the two results."""
    import torch
    import torch.nn.functional as F

    from training.models.sequence import full_softmax_loss, sampled_softmax_loss

    torch.set_num_threads(1)  # the comparison is per core; --threads 1 is the shared-machine advice
    generator = torch.Generator().manual_seed(seed)

    def timed(fn: Callable[[], object]) -> dict[str, Any]:
        return time_calls(fn, repeats, WARMUP)

    def loss_case(n: int, before: Callable[..., Any], after: Callable[..., Any]) -> dict[str, Any]:
        hidden = torch.randn(n_targets, DIM, generator=generator).requires_grad_()
        items = (torch.randn(n, DIM, generator=generator) * 0.5).requires_grad_()
        target = torch.randint(n, (n_targets,), generator=generator)
        negatives = torch.randint(n, (NEGATIVES,), generator=generator)

        def run(loss_fn: Callable[..., Any]) -> tuple[Any, Any, Any]:
            hidden.grad = items.grad = None
            loss = loss_fn(hidden, target, items, negatives)
            loss.backward()
            return loss.detach(), hidden.grad, items.grad

        want, got = run(before), run(after)
        difference = max(float((w - g).abs().max()) for w, g in zip(want, got))
        return _pair(n, timed(lambda: run(before)), timed(lambda: run(after)), difference)

    def full_reference(hidden: Any, target: Any, items: Any, _negatives: Any) -> Any:
        return F.cross_entropy(hidden @ items.T, target)

    def sampled_reference(hidden: Any, target: Any, items: Any, negatives: Any) -> Any:
        positive = (hidden * items[target]).sum(dim=1, keepdim=True)
        negative = (hidden @ items[negatives].T).masked_fill(negatives[None, :] == target[:, None], float("-inf"))
        logits = torch.cat([positive, negative], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(target), dtype=torch.long))

    def adam_case() -> dict[str, Any]:
        shapes = [(n_sampled_items + 1, DIM), *[(DIM, DIM)] * 8]
        initial = [torch.randn(s, generator=generator) for s in shapes]
        grads = [torch.randn(s, generator=generator) for s in shapes]

        def optimiser(fused: bool) -> tuple[list[torch.nn.Parameter], torch.optim.Adam]:
            params = [torch.nn.Parameter(p.clone()) for p in initial]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            return params, torch.optim.Adam(params, lr=1e-3, fused=fused)

        (plain, plain_opt), (fused, fused_opt) = optimiser(False), optimiser(True)
        plain_opt.step()
        fused_opt.step()
        difference = max(float((a.detach() - b.detach()).abs().max()) for a, b in zip(plain, fused))
        return _pair(n_sampled_items, timed(plain_opt.step), timed(fused_opt.step), difference)

    return {
        "targets": n_targets,
        "dim": DIM,
        "negatives": NEGATIVES,
        "repeats": repeats,
        "full_softmax": loss_case(n_items, full_reference, lambda h, t, i, _n: full_softmax_loss(h, t, i)),
        "sampled_softmax": loss_case(n_sampled_items, sampled_reference, sampled_softmax_loss),
        "adam_step": adam_case(),
        "torch_version": torch.__version__,
    }


def _pair(n_items: int, before: dict[str, Any], after: dict[str, Any], difference: float) -> dict[str, Any]:
    return {
        "items": n_items,
        "before_ms": before,
        "after_ms": after,
        "ratio": before["p50"] / after["p50"] if after["p50"] else float("nan"),
        "max_abs_diff": difference,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sequence_training", description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=6400, help="targets a step (default: ML-1M's 128 x 50)")
    parser.add_argument("--items", type=int, default=3706, help="full-softmax catalog (default: ML-1M's)")
    parser.add_argument("--sampled-items", type=int, default=60_000, help="sampled-softmax and Adam catalog")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each")
    args = parser.parse_args(argv)
    json.dump(measure(args.targets, args.items, args.sampled_items, args.repeats), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
