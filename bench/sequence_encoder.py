"""The sequence encoder at serving time: numpy forward pass vs ONNX Runtime, same weights.

    python -m bench.sequence_encoder [--items 3706] [--repeats 2000]

Exports a SASRec-shaped model (ML-1M's shape unless told otherwise: 64 dims, 2 blocks, 50 slots)
with ``torch.onnx``, runs it with ONNX Runtime (one intra-op thread, as each model-server worker
has one core) and with :class:`twostage_rec.sequence_encoder.SequenceEncoder`, checks both against
PyTorch, and times one user and a batch of 100. Prints JSON. Needs the dev extras (onnx,
onnxruntime): neither is in the serving image, which is the point of measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import numpy as np

from bench.stats import summarize

REPO: Final = Path(__file__).resolve().parent.parent
WARMUP: Final = 20
BATCH: Final = 100


def measure(n_items: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Export a randomly initialised model, check numpy and ONNX Runtime against PyTorch, time both.

    Latencies are summaries (:func:`bench.stats.summarize`) in ms over ``repeats`` calls for one
    user and a tenth as many (at least 20) for a batch, which costs ~100 times more.
    """
    import onnxruntime as ort
    import torch

    from training.models.sequence import SASRec, SequenceConfig, export, left_padded
    from twostage_rec.sequence_encoder import SequenceEncoder

    torch.manual_seed(seed)
    config = SequenceConfig()
    model = SASRec(n_items, config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    weights, layout, item_vectors = export(model, config)
    encoder = SequenceEncoder(weights, layout, item_vectors)
    rng = np.random.default_rng(seed)
    histories = [rng.integers(0, n_items, int(n)) for n in rng.integers(5, 200, BATCH)]
    padded = left_padded(histories, config.max_length)

    class UserVectors(torch.nn.Module):
        def __init__(self, inner: SASRec) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, seq: torch.Tensor) -> torch.Tensor:
            return self.inner.user_vectors(seq)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "encoder.onnx"
        torch.onnx.export(
            UserVectors(model).eval(),  # a new module is in training mode: dropout would be exported on
            (torch.from_numpy(padded[:2]),),
            str(path),
            input_names=["seq"],
            output_names=["user_vector"],
            dynamic_axes={"seq": {0: "batch"}, "user_vector": {0: "batch"}},
            dynamo=False,
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one core per model-server worker
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model.user_vectors(torch.from_numpy(padded)).numpy()
    onnx_out = session.run(None, {"seq": padded})[0]
    numpy_out = encoder.encode(histories)

    batch_repeats = max(20, repeats // 10)

    def timed(fn: Callable[[], object], calls: int) -> dict[str, Any]:
        for _ in range(WARMUP):
            fn()
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - started) * 1000.0)
        return summarize(samples).to_json()

    one = padded[:1]
    return {
        "n_items": n_items,
        "dim": config.dim,
        "n_blocks": config.n_blocks,
        "n_heads": config.n_heads,
        "max_length": config.max_length,
        "batch": BATCH,
        "repeats": repeats,
        "batch_repeats": batch_repeats,
        "max_abs_diff_vs_torch": {
            "numpy": float(np.abs(numpy_out - want).max()),
            "onnxruntime": float(np.abs(onnx_out - want).max()),
        },
        "one_user_ms": {
            "numpy": timed(lambda: encoder.encode(histories[:1]), repeats),
            "onnxruntime": timed(lambda: session.run(None, {"seq": one}), repeats),
        },
        "batch_ms": {
            "numpy": timed(lambda: encoder.encode(histories), batch_repeats),
            "onnxruntime": timed(lambda: session.run(None, {"seq": padded}), batch_repeats),
        },
        "onnxruntime_version": ort.__version__,
        "torch_version": torch.__version__,
    }


def measure_isolated(n_items: int, repeats: int) -> dict[str, Any]:
    """:func:`measure` in a child process (``python -m bench.sequence_encoder``): torch and ONNX
    Runtime, their threads and their memory stay out of the benchmark process.

    Raises ``RuntimeError`` with the child's last error line when it fails (e.g. no onnxruntime).
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
    args = parser.parse_args(argv)
    json.dump(measure(args.items, args.repeats), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
