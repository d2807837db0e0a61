"""The sequence model's encoder at serving time: a user's recent items in, one user vector out.

A SASRec-style causal self-attention encoder (trained in PyTorch by ``training/models/sequence.py``)
reads the user's last ``max_length`` items, oldest first, and its output at the last position is
the user vector; ``user vector . item vector`` is the model's score of an item. The image has no
torch: training exports the encoder with ``torch.onnx`` and this module runs it with ONNX Runtime,
which measured faster than a numpy forward pass at equal outputs (docs/architecture.md, "The sequence encoder in
the image"; ``python -m bench.sequence_encoder``). A test checks it against PyTorch's outputs
(``tests/unit/training/test_sequence_model.py``).

The graph starts after the item lookup: it takes the embedded items and their validity mask, and
the item vectors stay out of it. They are the artifact's memory-mapped array, shared by every
worker, where a copy inside each worker's session would cost catalog x dim x 4 bytes per worker.
Inputs are left-padded: a padded slot is zero and masked, so a batch is only as wide as its
longest history (up to ``max_length``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

GRAPH_ITEMS: Final = "items"  # float32 (batch, length, dim): the embedded items, zero where padded
GRAPH_VALID: Final = "valid"  # bool (batch, length): which slots hold an item
GRAPH_OUTPUT: Final = "user_vector"  # float32 (batch, dim)
# What ONNX Runtime raises for a graph it cannot load (its errors derive from Exception only).
_GRAPH_ERRORS: Final = (
    ort_errors.InvalidProtobuf,
    ort_errors.InvalidGraph,
    ort_errors.InvalidArgument,
    ort_errors.Fail,
    ort_errors.NotImplemented,
)


@dataclass(frozen=True)
class EncoderSpec:
    """The encoder's shape, as the manifest records it."""

    dim: int
    n_blocks: int
    n_heads: int
    max_length: int

    @classmethod
    def from_manifest(cls, body: Mapping[str, Any]) -> EncoderSpec:
        values = {name: body[name] for name in ("dim", "n_blocks", "n_heads", "max_length")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values.values()):
            raise ValueError(f"dim, n_blocks, n_heads and max_length must be positive integers, got {values}")
        return cls(**values)

    def to_manifest(self) -> dict[str, Any]:
        return {"dim": self.dim, "n_blocks": self.n_blocks, "n_heads": self.n_heads, "max_length": self.max_length}


class SequenceEncoder:
    """User vectors from item histories: the exported graph, run by ONNX Runtime on one thread."""

    def __init__(self, graph: bytes, spec: EncoderSpec, item_vectors: np.ndarray) -> None:
        """``graph`` is the ONNX model (``training.models.sequence.to_onnx``); ``item_vectors`` its
        (n_items, dim) input embeddings. Raises ``ValueError`` with one line when they disagree."""
        if item_vectors.ndim != 2 or item_vectors.shape[1] != spec.dim:
            raise ValueError(f"item vectors of shape {item_vectors.shape} for an encoder of dim {spec.dim}")
        options = ort.SessionOptions()
        # The model server runs one worker per core: a second thread per worker would only
        # oversubscribe the cores (and spin between requests).
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: the graph's unused-initializer notes are noise
        try:
            session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        except _GRAPH_ERRORS as exc:
            raise ValueError(f"the sequence encoder graph does not load ({str(exc).strip()[:200]})") from None
        inputs = {i.name: i.shape for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        if set(inputs) != {GRAPH_ITEMS, GRAPH_VALID} or outputs != [GRAPH_OUTPUT]:
            raise ValueError(f"the sequence encoder graph takes {sorted(inputs)} and gives {outputs}, "
                             f"expected {[GRAPH_ITEMS, GRAPH_VALID]} and {[GRAPH_OUTPUT]}")
        graph_dim = inputs[GRAPH_ITEMS][-1]
        if graph_dim != spec.dim:
            raise ValueError(f"the sequence encoder graph reads {graph_dim}-dim items, the manifest says {spec.dim}")
        self._session = session
        self._items = item_vectors
        self.spec = spec
        self.max_length = spec.max_length

    def encode(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """float32 (len(histories), dim): the user vector of each non-empty item history.

        Each history holds item indices oldest first; only the last ``max_length`` count.
        """
        if any(len(h) == 0 for h in histories):
            raise ValueError("every history needs at least one item")
        length = min(self.max_length, max(len(h) for h in histories))
        seq = np.full((len(histories), length), -1, dtype=np.int64)
        for row, history in enumerate(histories):
            tail = np.asarray(history[-length:], dtype=np.int64)
            seq[row, length - len(tail) :] = tail
        valid = seq >= 0
        embedded = np.asarray(self._items[np.where(valid, seq, 0)], dtype=np.float32)
        embedded *= valid[..., None]
        return self._session.run([GRAPH_OUTPUT], {GRAPH_ITEMS: embedded, GRAPH_VALID: valid})[0]
