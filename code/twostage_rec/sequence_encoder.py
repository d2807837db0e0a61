"""The sequence model's encoder in numpy: a user's recent items in, one user vector out.

A SASRec-style causal self-attention encoder (trained in PyTorch by ``training/models/sequence.py``)
reads the user's last ``max_length`` items, oldest first, and its output at the last position is
the user vector; ``user vector . item vector`` is the model's score of an item. The image has no
torch: this module runs the same forward pass with numpy, and a test checks it against PyTorch's
outputs (``tests/unit/training/test_sequence_model.py``). ``bench/sequence_encoder.py`` measured it
against ONNX Runtime on the same weights (README, "Sequence encoder").

The item vectors are tied: the same table embeds the input items and scores the output. Inputs are
left-padded to ``max_length`` slots; a padded slot contributes nothing (masked as a key, zeroed as
an output), so a batch may drop the leading slots that every history in it leaves empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

LAYER_NORM_EPS: Final = 1e-5  # torch.nn.LayerNorm's default


@dataclass(frozen=True)
class EncoderLayout:
    """The encoder's shape and where each weight sits in the flat weight array."""

    dim: int
    n_blocks: int
    n_heads: int
    max_length: int
    tensors: dict[str, tuple[int, tuple[int, ...]]]  # name -> (offset, shape)

    @classmethod
    def from_manifest(cls, body: Mapping[str, Any]) -> EncoderLayout:
        tensors = {name: (int(spec[0]), tuple(int(d) for d in spec[1])) for name, spec in body["tensors"].items()}
        return cls(int(body["dim"]), int(body["n_blocks"]), int(body["n_heads"]), int(body["max_length"]), tensors)

    def to_manifest(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "n_blocks": self.n_blocks,
            "n_heads": self.n_heads,
            "max_length": self.max_length,
            "tensors": {name: [offset, list(shape)] for name, (offset, shape) in self.tensors.items()},
        }


def block_tensor_names(block: int) -> tuple[str, ...]:
    """The weights of one transformer block, in PyTorch ``nn.Linear`` convention (out, in)."""
    return tuple(
        f"blocks.{block}.{name}"
        for name in (
            "attention_norm.weight",
            "attention_norm.bias",
            "qkv.weight",
            "qkv.bias",
            "out.weight",
            "out.bias",
            "feed_forward_norm.weight",
            "feed_forward_norm.bias",
            "ff1.weight",
            "ff1.bias",
            "ff2.weight",
            "ff2.bias",
        )
    )


def tensor_names(n_blocks: int) -> tuple[str, ...]:
    """Every weight the encoder reads besides the item vectors."""
    names: list[str] = ["position_embedding"]
    for block in range(n_blocks):
        names.extend(block_tensor_names(block))
    names.extend(["final_norm.weight", "final_norm.bias"])
    return tuple(names)


def pack_weights(
    tensors: Mapping[str, np.ndarray], dim: int, n_blocks: int, n_heads: int
) -> tuple[np.ndarray, EncoderLayout]:
    """One flat float32 array of the named weights and its layout (training side)."""
    layout: dict[str, tuple[int, tuple[int, ...]]] = {}
    parts = []
    offset = 0
    for name in tensor_names(n_blocks):
        array = np.asarray(tensors[name], dtype=np.float32)
        layout[name] = (offset, tuple(array.shape))
        parts.append(array.ravel())
        offset += array.size
    max_length = int(np.asarray(tensors["position_embedding"]).shape[0])
    return np.concatenate(parts), EncoderLayout(dim, n_blocks, n_heads, max_length, layout)


class SequenceEncoder:
    """User vectors from item histories, with the weights of a trained sequence model."""

    def __init__(self, weights: np.ndarray, layout: EncoderLayout, item_vectors: np.ndarray) -> None:
        missing = [n for n in tensor_names(layout.n_blocks) if n not in layout.tensors]
        if missing:
            raise ValueError(f"sequence model weights lack {missing[:3]}")
        if layout.dim % layout.n_heads:
            raise ValueError(f"sequence dim {layout.dim} is not a multiple of n_heads {layout.n_heads}")
        flat = np.asarray(weights, dtype=np.float32)
        # Copies: the weights are small, and a contiguous private array is faster than a memmap view.
        self._w = {name: np.array(flat[o : o + int(np.prod(s))].reshape(s)) for name, (o, s) in layout.tensors.items()}
        self._items = item_vectors
        self.layout = layout
        self.max_length = layout.max_length

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
        return self._forward(seq)

    def _forward(self, seq: np.ndarray) -> np.ndarray:
        w, layout = self._w, self.layout
        batch, length = seq.shape
        valid = seq >= 0
        positions = w["position_embedding"][layout.max_length - length :]
        x = np.asarray(self._items[np.where(valid, seq, 0)], dtype=np.float32) + positions[None]
        x *= valid[..., None]
        # A query attends to itself and to the valid slots before it; the diagonal keeps a padded
        # query's softmax defined (its output is zeroed anyway).
        allowed = np.tril(np.ones((length, length), dtype=bool))[None] & valid[:, None, :]
        allowed |= np.eye(length, dtype=bool)[None]
        for block in range(layout.n_blocks):
            last_only = block == layout.n_blocks - 1  # the user vector needs only the last slot's output
            x = self._block(block, x, allowed, valid, last_only)
        return _layer_norm(x[:, -1], w["final_norm.weight"], w["final_norm.bias"])

    def _block(self, block: int, x: np.ndarray, allowed: np.ndarray, valid: np.ndarray, last_only: bool) -> np.ndarray:
        w = {name.split(".", 2)[2]: self._w[name] for name in block_tensor_names(block)}
        batch, length, dim = x.shape
        heads, head_dim = self.layout.n_heads, dim // self.layout.n_heads
        y = _layer_norm(x, w["attention_norm.weight"], w["attention_norm.bias"])
        qkv = (y @ w["qkv.weight"].T + w["qkv.bias"]).reshape(batch, length, 3, heads, head_dim)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (batch, heads, length, head_dim)
        mask = allowed[:, None]
        if last_only:
            q, mask, x = q[:, :, -1:], mask[:, :, -1:], x[:, -1:]
        logits = (q @ k.transpose(0, 1, 3, 2)) / np.float32(np.sqrt(head_dim))
        logits = np.where(mask, logits, np.float32(-np.inf))
        logits -= logits.max(axis=-1, keepdims=True)
        weights = np.exp(logits)
        weights /= weights.sum(axis=-1, keepdims=True)
        attended = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, -1, dim)
        x = x + attended @ w["out.weight"].T + w["out.bias"]
        y = _layer_norm(x, w["feed_forward_norm.weight"], w["feed_forward_norm.bias"])
        x = x + np.maximum(y @ w["ff1.weight"].T + w["ff1.bias"], 0.0) @ w["ff2.weight"].T + w["ff2.bias"]
        return x * (valid[:, -1:, None] if last_only else valid[..., None])


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + LAYER_NORM_EPS)) * weight + bias
