"""The sequence encoder at serving time: ONNX Runtime (what the image runs) vs PyTorch, same weights.

    python -m bench.sequence_encoder [--items 3706] [--repeats 2000] [--max-length N] [--blocks N] [--heads N]
        [--feed-forward relu|swiglu] [--ff-multiplier N] [--gated-residual]

Builds a SASRec-shaped model (``SequenceConfig``'s defaults, what ML-1M trains, unless told otherwise),
exports it as training does (``training.models.sequence.export``), and runs it as serving does
(:class:`twostage_rec.sequence_encoder.SequenceEncoder`: the item lookup in numpy, the graph in ONNX
Runtime on one intra-op thread, as each model-server worker has one core) and as PyTorch does (one
thread); checks the outputs agree and times one user and a batch of 100. Prints JSON. Needs torch
(the training extras), which the image does not have.

The numpy forward pass that the image ran before ONNX Runtime is no longer in the code: at
0e47b0e it measured 0.56 ms for one user and 30 ms for a batch of 100, against 0.36 and 19 ms for
ONNX Runtime on the same weights (docs/architecture.md, "The sequence encoder in the image").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import numpy as np

from bench.stats import time_calls

REPO: Final = Path(__file__).resolve().parent.parent
WARMUP: Final = 20
BATCH: Final = 100


def measure(n_items: int, repeats: int, seed: int = 0, shape: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export a randomly initialised model, check ONNX Runtime against PyTorch, time both.

    ``shape``: ``SequenceConfig`` fields that differ from its defaults (max_length, n_blocks, ...).
    Latencies are summaries (:func:`bench.stats.summarize`) in ms over ``repeats`` calls for one
    user and a tenth as many (at least 20) for a batch, which costs ~100 times more.
    """
    import onnxruntime as ort
    import torch

    from training.models.sequence import SASRec, SequenceConfig, export, left_padded
    from twostage_rec.sequence_encoder import SequenceEncoder

    torch.set_num_threads(1)  # as the serving encoder: one core per model-server worker
    torch.manual_seed(seed)
    config = SequenceConfig(**(shape or {}))
    model = SASRec(n_items, config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    graph, spec, item_vectors = export(model, config)
    encoder = SequenceEncoder(graph, spec, item_vectors)
    rng = np.random.default_rng(seed)
    histories = [rng.integers(0, n_items, int(n)) for n in rng.integers(5, 200, BATCH)]
    padded = torch.from_numpy(left_padded(histories, config.max_length))
    with torch.no_grad():
        want = model.user_vectors(padded).numpy()
    served = encoder.encode(histories)

    batch_repeats = max(20, repeats // 10)

    def timed(fn: Callable[[], object], calls: int) -> dict[str, Any]:
        return time_calls(fn, calls, WARMUP)

    def torch_vectors(seq: torch.Tensor) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return model.user_vectors(seq)

        return run

    return {
        "n_items": n_items,
        "dim": config.dim,
        "n_blocks": config.n_blocks,
        "n_heads": config.n_heads,
        "max_length": config.max_length,
        "feed_forward": config.feed_forward,
        "ff_multiplier": config.ff_multiplier,
        "gated_residual": config.gated_residual,
        "batch": BATCH,
        "repeats": repeats,
        "batch_repeats": batch_repeats,
        "max_abs_diff_vs_torch": {"onnxruntime": float(np.abs(served - want).max()), "torch": 0.0},
        "one_user_ms": {
            "onnxruntime": timed(lambda: encoder.encode(histories[:1]), repeats),
            "torch": timed(torch_vectors(padded[:1]), repeats),
        },
        "batch_ms": {
            "onnxruntime": timed(lambda: encoder.encode(histories), batch_repeats),
            "torch": timed(torch_vectors(padded), batch_repeats),
        },
        "onnxruntime_version": ort.__version__,
        "torch_version": torch.__version__,
    }


def measure_isolated(n_items: int, repeats: int) -> dict[str, Any]:
    """:func:`measure` in a child process (``python -m bench.sequence_encoder``): torch and ONNX
    Runtime, their threads and their memory stay out of the benchmark process.

    Raises ``RuntimeError`` with the child's last error line when it fails (e.g. no torch).
    """
    command = [sys.executable, "-m", "bench.sequence_encoder", "--items", str(n_items), "--repeats", str(repeats)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "code"), str(REPO)])}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"status {result.returncode}"])[-1]
        raise RuntimeError(f"python -m bench.sequence_encoder failed: {last}")
    return json.loads(result.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sequence_encoder", description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=3706, help="catalog size (default: ML-1M's)")
    parser.add_argument("--repeats", type=int, default=2000, help="timed one-user calls (a tenth as many batches)")
    parser.add_argument("--max-length", type=int, help="slots read (default: SequenceConfig's)")
    parser.add_argument("--blocks", type=int, dest="n_blocks", help="attention blocks")
    parser.add_argument("--heads", type=int, dest="n_heads", help="attention heads")
    parser.add_argument("--feed-forward", choices=("relu", "swiglu"), help="the blocks' feed-forward layer")
    parser.add_argument("--ff-multiplier", type=int, help="feed-forward hidden units per dim")
    parser.add_argument("--gated-residual", action="store_true", default=None, help="LiGR's gated residuals")
    args = parser.parse_args(argv)
    names = ("max_length", "n_blocks", "n_heads", "feed_forward", "ff_multiplier", "gated_residual")
    shape = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    json.dump(measure(args.items, args.repeats, shape=shape), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
