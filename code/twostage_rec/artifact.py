"""The model artifact: one module owns every file name, writes it and validates it.

The directory is what SageMaker unpacks from ``model.tar.gz`` into ``/opt/ml/model``. Nothing in
it needs pickle: arrays are ``.npy`` (loaded with ``allow_pickle=False``), ids and metadata are
JSON, the ranker is XGBoost's own ``.ubj``. Arrays are memory-mapped so every model-server worker
shares the same pages.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

import numpy as np

from twostage_rec.ann import IvfIndex
from twostage_rec.id_table import IdTable, IdTableArrays

FORMAT_VERSION: Final = 5

MANIFEST: Final = "model_manifest.json"  # not manifest.json: MMS parses any MANIFEST.json (any case) as its own
USER_FACTORS: Final = "user_factors.npy"
ITEM_FACTORS: Final = "item_factors.npy"
# External ids as memory-mappable tables (twostage_rec.id_table): bytes, offsets, sorted hashes, order.
ID_TABLE_PARTS: Final = ("data", "offsets", "hashes", "order")
USER_ID_FILES: Final = tuple(f"user_id_{part}.npy" for part in ID_TABLE_PARTS)
ITEM_ID_FILES: Final = tuple(f"item_id_{part}.npy" for part in ID_TABLE_PARTS)
# Every interaction of each user in time order (CSR by user_idx): what the user has seen (never
# recommended again), their history (the last ``history_length`` up to a request's ``as_of``) and their
# point-in-time features (twostage_rec.timelines).
SEEN_INDPTR: Final = "seen_indptr.npy"
SEEN_INDICES: Final = "seen_indices.npy"
SEEN_TIMESTAMPS: Final = "seen_timestamps.npy"
SEEN_RATING_SUMS: Final = "seen_rating_sums.npy"
# Every interaction of each item in time order (CSR by item_idx): the items' statistics at any as_of.
ITEM_TIMELINE_INDPTR: Final = "item_timeline_indptr.npy"
ITEM_TIMELINE_TIMESTAMPS: Final = "item_timeline_timestamps.npy"
ITEM_TIMELINE_RATING_SUMS: Final = "item_timeline_rating_sums.npy"
RANKER: Final = "ranker.ubj"
RATING_MODEL: Final = "rating_model.ubj"
ITEM_FEATURES: Final = "item_features.npy"
POPULAR_ITEMS: Final = "popular_items.npy"
FEATURE_IMPORTANCE: Final = "feature_importance.json"
# Each item's top neighbours by windowed co-occurrence, best first (CSR by item_idx).
NEIGHBOUR_INDPTR: Final = "neighbour_indptr.npy"
NEIGHBOUR_ITEMS: Final = "neighbour_items.npy"
NEIGHBOUR_SCORES: Final = "neighbour_scores.npy"
# The optional sequence model: its encoder as an ONNX graph (shape in the manifest) and its item
# vectors (the encoder's input embeddings and its output side); with an IVF index of its own at
# large catalogs.
SEQUENCE_GRAPH: Final = "sequence_encoder.onnx"
SEQUENCE_ITEM_VECTORS: Final = "sequence_item_vectors.npy"
SEQUENCE_FILES: Final = (SEQUENCE_GRAPH, SEQUENCE_ITEM_VECTORS)
# The optional IVF index of large catalogs (twostage_rec.ann): all four files or none.
ANN_CENTROIDS: Final = "ann_centroids.npy"
ANN_LIST_OFFSETS: Final = "ann_list_offsets.npy"
ANN_ITEM_IDX: Final = "ann_item_idx.npy"
ANN_VECTORS: Final = "ann_vectors.npy"
ANN_FILES: Final = (ANN_CENTROIDS, ANN_LIST_OFFSETS, ANN_ITEM_IDX, ANN_VECTORS)
SEQUENCE_ANN_PREFIX: Final = "sequence_"  # sequence_ann_centroids.npy, ...
_MAX_HASH_THREADS: Final = 8

_ARRAY_FILES: Final = (
    USER_FACTORS,
    ITEM_FACTORS,
    SEEN_INDPTR,
    SEEN_INDICES,
    SEEN_TIMESTAMPS,
    SEEN_RATING_SUMS,
    ITEM_TIMELINE_INDPTR,
    ITEM_TIMELINE_TIMESTAMPS,
    ITEM_TIMELINE_RATING_SUMS,
    ITEM_FEATURES,
    POPULAR_ITEMS,
    NEIGHBOUR_INDPTR,
    NEIGHBOUR_ITEMS,
    NEIGHBOUR_SCORES,
    *USER_ID_FILES,
    *ITEM_ID_FILES,
)
REQUIRED_FILES: Final = (*_ARRAY_FILES, RANKER, RATING_MODEL)


class ArtifactError(Exception):
    """The model directory is missing, corrupt or inconsistent. The message is one line."""


@dataclass(frozen=True)
class FeatureStoreSchema:
    """How item features are laid out in SageMaker Feature Store."""

    feature_group_name: str
    record_identifier_name: str
    event_time_feature_name: str
    # Feature name -> Feature Store type ("Integral" | "Fractional" | "String").
    feature_types: dict[str, str]


@dataclass(frozen=True)
class UserHistorySchema:
    """How each user's recent history is laid out in its own Feature Store group.

    One record per user: the record id is the user id, the event time is the record's version
    (see ``training/events.py``), and two String features hold JSON lists of the user's last
    ``Manifest.history_length`` item ids and their epoch-second timestamps, oldest first.
    """

    feature_group_name: str
    record_identifier_name: str = "user_id"
    event_time_feature_name: str = "event_time"
    item_ids_feature_name: str = "item_ids"
    timestamps_feature_name: str = "timestamps"


@dataclass(frozen=True)
class Manifest:
    """Everything serving needs to know about the arrays, in one JSON file."""

    model_version: str
    item_id_field: str
    n_users: int
    n_items: int
    factor_dim: int  # width of the folded vectors, i.e. embedding dim + 2
    rating_min: float
    rating_max: float
    ranker_objective: str
    ranker_features: list[str]
    user_feature_names: list[str]
    item_feature_names: list[str]
    categories: list[str]
    feature_store: FeatureStoreSchema
    retrieval_objective: str = "bpr"
    # How many of a user's latest interactions the history-aware parts read (and Feature Store keeps).
    history_length: int = 50
    # One second after the newest interaction the model was trained on: what the artifact knows ends
    # here; events at or after it reach a request through Feature Store or recent_items.
    data_end: int = 0
    # The ranker's "hours since the last interaction" never exceeds the largest it was trained on.
    gap_cap_hours: float | None = None
    user_history: UserHistorySchema | None = None
    # Stage 1: per-source settings and fusion weights (twostage_rec.sources reads them).
    sources: dict[str, dict[str, float]] = field(default_factory=dict)
    # The sequence encoder's shape (twostage_rec.sequence_encoder.EncoderSpec); None when the
    # model has no sequence model.
    sequence_model: dict[str, Any] | None = None
    dataset: str = ""
    created_at: str = ""
    format_version: int = FORMAT_VERSION
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body = {k: v for k, v in self.__dict__.items() if k not in ("feature_store", "user_history")}
        body["feature_store"] = dict(self.feature_store.__dict__)
        body["user_history"] = None if self.user_history is None else dict(self.user_history.__dict__)
        return body

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Manifest:
        version = body.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{MANIFEST}: format_version {version!r} is not supported by this server "
                f"(it reads version {FORMAT_VERSION}); rebuild the artifact or upgrade the image"
            )
        try:
            fields = dict(body)
            fields["feature_store"] = FeatureStoreSchema(**body["feature_store"])
            history = body.get("user_history")
            fields["user_history"] = None if history is None else UserHistorySchema(**history)
            return cls(**fields)
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"{MANIFEST}: malformed manifest ({exc})") from None


@dataclass(frozen=True)
class ModelArtifact:
    """A loaded, validated model directory. Arrays are read-only memory maps."""

    path: Path
    manifest: Manifest
    user_ids: IdTable  # a read-only sequence of str (position = user_idx) with .position(id)
    item_ids: IdTable
    user_factors: np.ndarray  # float32 (n_users, factor_dim): [b_u, 1, e_u]
    item_factors: np.ndarray  # float32 (n_items, factor_dim): [1, b_i, e_i]
    seen_indptr: np.ndarray  # int64 (n_users + 1,)
    seen_indices: np.ndarray  # int32 item_idx, each user's interactions in time order, CSR
    seen_timestamps: np.ndarray  # int64 epoch seconds, aligned with seen_indices
    seen_rating_sums: np.ndarray  # float64 running rating sums within each user, aligned
    item_timeline_indptr: np.ndarray  # int64 (n_items + 1,)
    item_timeline_timestamps: np.ndarray  # int64, each item's interactions in time order
    item_timeline_rating_sums: np.ndarray  # float64 running rating sums within each item, aligned
    item_features: np.ndarray  # float32 (n_items, len(item_feature_names)), as of data_end
    popular_items: np.ndarray  # int32 item_idx, most popular first
    neighbour_indptr: np.ndarray  # int64 (n_items + 1,)
    neighbour_items: np.ndarray  # int32 item_idx, each item's neighbours, best first
    neighbour_scores: np.ndarray  # float32, aligned with neighbour_items
    ann_index: IvfIndex | None = None  # present when packaging built one (large catalogs)
    sequence_graph: bytes | None = None  # ONNX model; its shape in manifest.sequence_model
    sequence_item_vectors: np.ndarray | None = None  # float32 (n_items, sequence dim)
    sequence_ann_index: IvfIndex | None = None

    @property
    def ranker_path(self) -> Path:
        return self.path / RANKER

    @property
    def rating_model_path(self) -> Path:
        return self.path / RATING_MODEL


@dataclass
class ArtifactParts:
    """What training hands to :func:`write_artifact`."""

    manifest: Manifest
    user_ids: Sequence[str]
    item_ids: Sequence[str]
    user_factors: np.ndarray
    item_factors: np.ndarray
    seen_indptr: np.ndarray
    seen_indices: np.ndarray
    seen_timestamps: np.ndarray
    seen_rating_sums: np.ndarray
    item_timeline_indptr: np.ndarray
    item_timeline_timestamps: np.ndarray
    item_timeline_rating_sums: np.ndarray
    item_features: np.ndarray
    popular_items: np.ndarray
    neighbour_indptr: np.ndarray
    neighbour_items: np.ndarray
    neighbour_scores: np.ndarray
    ranker_bytes: bytes  # Booster.save_raw("ubj"): orders the candidates
    rating_model_bytes: bytes  # Booster.save_raw("ubj"): the predicted rating of a candidate
    feature_importance: Mapping[str, float] = field(default_factory=dict)
    ann_index: IvfIndex | None = None  # training/ann_index.py: with_ann_index
    sequence_graph: bytes | None = None  # training.models.sequence.to_onnx
    sequence_item_vectors: np.ndarray | None = None
    sequence_ann_index: IvfIndex | None = None


_ID_DTYPES: Final = dict(zip(ID_TABLE_PARTS, (np.uint8, np.int64, np.uint64, np.int64)))
_DTYPES: Final[dict[str, type]] = {
    **{name: _ID_DTYPES[part] for prefix in ("user", "item") for part in ID_TABLE_PARTS
       for name in (f"{prefix}_id_{part}.npy",)},
    USER_FACTORS: np.float32,
    ITEM_FACTORS: np.float32,
    SEEN_INDPTR: np.int64,
    SEEN_INDICES: np.int32,
    SEEN_TIMESTAMPS: np.int64,
    SEEN_RATING_SUMS: np.float64,
    ITEM_TIMELINE_INDPTR: np.int64,
    ITEM_TIMELINE_TIMESTAMPS: np.int64,
    ITEM_TIMELINE_RATING_SUMS: np.float64,
    ITEM_FEATURES: np.float32,
    POPULAR_ITEMS: np.int32,
    NEIGHBOUR_INDPTR: np.int64,
    NEIGHBOUR_ITEMS: np.int32,
    NEIGHBOUR_SCORES: np.float32,
    SEQUENCE_ITEM_VECTORS: np.float32,
    ANN_CENTROIDS: np.float32,
    ANN_LIST_OFFSETS: np.int64,
    ANN_ITEM_IDX: np.int32,
    ANN_VECTORS: np.float32,
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: Sequence[Path]) -> dict[str, str]:
    """File name -> sha256 of each of ``paths``, several files at a time.

    hashlib releases the GIL while it hashes, so threads use every core: at 10M users the
    artifact is ~4 GB and hashing it one file after the other was most of ``serve``'s cold start.
    The largest files start first, so the longest one is not left for last.
    """
    ordered = sorted(paths, key=lambda p: p.stat().st_size, reverse=True)
    workers = max(1, min(len(ordered), os.cpu_count() or 1, _MAX_HASH_THREADS))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return {p.name: digest for p, digest in zip(ordered, pool.map(sha256_file, ordered))}


def write_artifact(parts: ArtifactParts, model_dir: Path) -> Manifest:
    """Write a complete model directory atomically and return its final manifest.

    Files go to a sibling temporary folder which is validated and then renamed into place, so a
    failure never leaves a partial artifact at ``model_dir``.
    """
    model_dir = Path(model_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-", dir=model_dir.parent))
    # mkdtemp makes the folder private (0700); a model is read by a container running as
    # another user, so give it the usual directory mode.
    staging.chmod(0o755)
    try:
        arrays = {
            USER_FACTORS: parts.user_factors,
            ITEM_FACTORS: parts.item_factors,
            SEEN_INDPTR: parts.seen_indptr,
            SEEN_INDICES: parts.seen_indices,
            SEEN_TIMESTAMPS: parts.seen_timestamps,
            SEEN_RATING_SUMS: parts.seen_rating_sums,
            ITEM_TIMELINE_INDPTR: parts.item_timeline_indptr,
            ITEM_TIMELINE_TIMESTAMPS: parts.item_timeline_timestamps,
            ITEM_TIMELINE_RATING_SUMS: parts.item_timeline_rating_sums,
            ITEM_FEATURES: parts.item_features,
            POPULAR_ITEMS: parts.popular_items,
            NEIGHBOUR_INDPTR: parts.neighbour_indptr,
            NEIGHBOUR_ITEMS: parts.neighbour_items,
            NEIGHBOUR_SCORES: parts.neighbour_scores,
        }
        if (parts.sequence_graph is None) != (parts.sequence_item_vectors is None):
            raise ValueError("a sequence model needs both its graph and its item vectors")
        if parts.sequence_graph is not None:
            arrays[SEQUENCE_ITEM_VECTORS] = parts.sequence_item_vectors  # type: ignore[assignment]
            (staging / SEQUENCE_GRAPH).write_bytes(parts.sequence_graph)
        for files, ids in ((USER_ID_FILES, parts.user_ids), (ITEM_ID_FILES, parts.item_ids)):
            table = IdTableArrays.build(list(ids))
            arrays.update(zip(files, (table.data, table.offsets, table.hashes, table.order)))
        for prefix, index in (("", parts.ann_index), (SEQUENCE_ANN_PREFIX, parts.sequence_ann_index)):
            if index is not None:
                arrays[prefix + ANN_CENTROIDS] = index.centroids
                arrays[prefix + ANN_LIST_OFFSETS] = index.list_offsets
                arrays[prefix + ANN_ITEM_IDX] = index.item_idx
                arrays[prefix + ANN_VECTORS] = index.vectors
        for name, array in arrays.items():
            is_sequence_index = name.startswith(SEQUENCE_ANN_PREFIX + "ann_")
            dtype = _DTYPES[name.removeprefix(SEQUENCE_ANN_PREFIX) if is_sequence_index else name]
            np.save(staging / name, np.ascontiguousarray(array, dtype=dtype), allow_pickle=False)
        (staging / RANKER).write_bytes(parts.ranker_bytes)
        (staging / RATING_MODEL).write_bytes(parts.rating_model_bytes)
        _write_json(staging / FEATURE_IMPORTANCE, dict(parts.feature_importance))

        files = dict(sorted(sha256_files(list(staging.iterdir())).items()))
        manifest = Manifest(
            **{
                **parts.manifest.__dict__,
                "format_version": FORMAT_VERSION,
                "created_at": parts.manifest.created_at
                or datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "files": files,
            }
        )
        _write_json(staging / MANIFEST, manifest.to_json())
        load_artifact(staging, verify_checksums=True)  # never publish what we cannot load
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(staging, model_dir)
        return manifest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def pack_model_tar(model_dir: Path, tar_path: Path) -> Path:
    """Write ``model.tar.gz`` with the files at the archive root, as SageMaker expects."""
    tar_path = Path(tar_path)
    partial = tar_path.with_name(tar_path.name + ".partial")
    # gzip level 1, not tarfile's 9: the arrays are floats that barely compress, and level 9 was
    # 90% of the artifact stage (1M-interaction model: 16.3 s and 82.2 MB at 9, 2.3 s and 83.5 MB
    # at 1; ML-1M: 3.0 s and 9.8 MB against 0.3 s and 10.6 MB). Reading back costs the same.
    with tarfile.open(partial, "w:gz", compresslevel=1) as archive:
        for path in sorted(Path(model_dir).iterdir()):
            archive.add(path, arcname=path.name)
    os.replace(partial, tar_path)
    return tar_path


def read_manifest(model_dir: Path) -> Manifest:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: not found; is {model_dir} a model directory written by training?")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(body, dict):
        raise ArtifactError(f"{path}: the manifest must be a JSON object")
    return Manifest.from_json(body)


def load_artifact(model_dir: Path, verify_checksums: bool = True, check_values: bool | None = None) -> ModelArtifact:
    """Load and validate a model directory; raise :class:`ArtifactError` with one clear line.

    ``verify_checksums`` hashes every file against the manifest; ``check_values`` (by default the
    same) scans the arrays' values: CSR pointers rising, indices inside the catalog, id tables
    sorted. The ``serve`` entrypoint does both once before the model server starts; its workers
    skip both and check shapes only: the files are the ones just verified, and the scans read every
    user's rows (~2 s at 10M users, in every worker).
    """
    check_values = verify_checksums if check_values is None else check_values
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    for name in REQUIRED_FILES:
        if not (model_dir / name).is_file():
            raise ArtifactError(f"{model_dir / name}: required artifact file is missing")
        if name not in manifest.files:
            raise ArtifactError(f"{MANIFEST}: no sha256 recorded for {name}")
    if verify_checksums:
        for name in manifest.files:
            if not (model_dir / name).is_file():
                raise ArtifactError(f"{model_dir / name}: listed in the manifest but missing")
        digests = sha256_files([model_dir / name for name in manifest.files])
        for name, expected in manifest.files.items():
            if digests[name] != expected:
                path = model_dir / name
                raise ArtifactError(f"{path}: sha256 mismatch with {MANIFEST}; the file is corrupt or was changed")

    arrays = {name: _load_array(model_dir / name) for name in _ARRAY_FILES}
    user_ids = _id_table(model_dir, arrays, USER_ID_FILES, scan=check_values)
    item_ids = _id_table(model_dir, arrays, ITEM_ID_FILES, scan=check_values)
    artifact = ModelArtifact(
        path=model_dir,
        manifest=manifest,
        user_ids=user_ids,
        item_ids=item_ids,
        user_factors=arrays[USER_FACTORS],
        item_factors=arrays[ITEM_FACTORS],
        seen_indptr=arrays[SEEN_INDPTR],
        seen_indices=arrays[SEEN_INDICES],
        seen_timestamps=arrays[SEEN_TIMESTAMPS],
        seen_rating_sums=arrays[SEEN_RATING_SUMS],
        item_timeline_indptr=arrays[ITEM_TIMELINE_INDPTR],
        item_timeline_timestamps=arrays[ITEM_TIMELINE_TIMESTAMPS],
        item_timeline_rating_sums=arrays[ITEM_TIMELINE_RATING_SUMS],
        item_features=arrays[ITEM_FEATURES],
        popular_items=arrays[POPULAR_ITEMS],
        neighbour_indptr=arrays[NEIGHBOUR_INDPTR],
        neighbour_items=arrays[NEIGHBOUR_ITEMS],
        neighbour_scores=arrays[NEIGHBOUR_SCORES],
        ann_index=_load_ann_index(model_dir, manifest, "", manifest.factor_dim),
        **_load_sequence_model(model_dir, manifest),
    )
    _check_shapes(artifact)
    if check_values:
        _check_values(artifact)
    return artifact


def _load_ann_index(model_dir: Path, manifest: Manifest, prefix: str, dim: int) -> IvfIndex | None:
    names = [prefix + name for name in ANN_FILES]
    centroids_name, offsets_name, item_idx_name, vectors_name = names
    listed = [name for name in names if name in manifest.files]
    if not listed:
        return None
    if len(listed) != len(names):
        raise ArtifactError(f"{MANIFEST}: the ANN index needs all of {names}, the manifest lists {listed}")
    for name in names:
        if not (model_dir / name).is_file():
            raise ArtifactError(f"{model_dir / name}: listed in the manifest but missing")
    a = {name: _load_array(model_dir / name, _DTYPES[name.removeprefix(prefix)]) for name in names}
    m = manifest
    n_lists = a[centroids_name].shape[0] if a[centroids_name].ndim == 2 else -1
    expected = {
        centroids_name: (n_lists, dim + 1),
        offsets_name: (n_lists + 1,),
        item_idx_name: (m.n_items,),
        vectors_name: (m.n_items, dim),
    }
    for name, shape in expected.items():
        if n_lists < 1 or a[name].shape != shape:
            raise ArtifactError(f"{model_dir / name}: shape {a[name].shape}, expected {shape}")
    offsets = a[offsets_name]
    if offsets[0] != 0 or offsets[-1] != m.n_items or np.any(np.diff(offsets) < 0):
        raise ArtifactError(f"{model_dir / offsets_name}: not increasing from 0 to {m.n_items}")
    item_idx = a[item_idx_name]
    if len(item_idx) and (int(item_idx.min()) < 0 or int(item_idx.max()) >= m.n_items):
        raise ArtifactError(f"{model_dir / item_idx_name}: item index out of range [0, {m.n_items})")
    return IvfIndex(centroids=a[centroids_name], list_offsets=offsets, item_idx=item_idx, vectors=a[vectors_name])


def _load_sequence_model(model_dir: Path, manifest: Manifest) -> dict[str, Any]:
    """The sequence model's files (all or none), checked against the manifest's shape.

    The graph itself is loaded (and refused when broken) by ``twostage_rec.sources.assembly``:
    this module does not run models.
    """
    listed = [name for name in SEQUENCE_FILES if name in manifest.files]
    if not listed and manifest.sequence_model is None:
        return {}
    if len(listed) != len(SEQUENCE_FILES) or manifest.sequence_model is None:
        raise ArtifactError(
            f"{MANIFEST}: a sequence model needs {list(SEQUENCE_FILES)} and a sequence_model shape; "
            f"the manifest lists {listed} and {'no' if manifest.sequence_model is None else 'a'} shape"
        )
    graph_path = model_dir / SEQUENCE_GRAPH
    if not graph_path.is_file():
        raise ArtifactError(f"{graph_path}: listed in the manifest but missing")
    vectors = _load_array(model_dir / SEQUENCE_ITEM_VECTORS)
    dim = manifest.sequence_model.get("dim")
    if not isinstance(dim, int) or vectors.shape != (manifest.n_items, dim):
        raise ArtifactError(
            f"{model_dir / SEQUENCE_ITEM_VECTORS}: shape {vectors.shape}, but the model has "
            f"{manifest.n_items} items and a sequence dim of {dim}: the sequence model does not match this catalog"
        )
    return {
        "sequence_graph": graph_path.read_bytes(),
        "sequence_item_vectors": vectors,
        "sequence_ann_index": _load_ann_index(model_dir, manifest, SEQUENCE_ANN_PREFIX, dim),
    }


def _check_shapes(a: ModelArtifact) -> None:
    m = a.manifest
    expected: dict[str, tuple[np.ndarray, tuple[int, ...]]] = {
        USER_FACTORS: (a.user_factors, (m.n_users, m.factor_dim)),
        ITEM_FACTORS: (a.item_factors, (m.n_items, m.factor_dim)),
        SEEN_INDPTR: (a.seen_indptr, (m.n_users + 1,)),
        ITEM_TIMELINE_INDPTR: (a.item_timeline_indptr, (m.n_items + 1,)),
        ITEM_FEATURES: (a.item_features, (m.n_items, len(m.item_feature_names))),
        NEIGHBOUR_INDPTR: (a.neighbour_indptr, (m.n_items + 1,)),
    }
    for name, (array, shape) in expected.items():
        if array.shape != shape:
            raise ArtifactError(f"{a.path / name}: shape {array.shape}, manifest says {shape}")
    if len(a.user_ids) != m.n_users or len(a.item_ids) != m.n_items:
        raise ArtifactError(
            f"{a.path}: {len(a.user_ids)} user ids / {len(a.item_ids)} item ids, "
            f"manifest says {m.n_users} / {m.n_items}"
        )
    for indptr_name, indptr, aligned in _csr_arrays(a):
        total = int(indptr[-1]) if len(indptr) else 0
        for name, array in aligned:
            if array.ndim != 1 or len(array) != total:
                raise ArtifactError(f"{a.path / name}: length {len(array)}, {indptr_name} says {total}")
    missing = [f for f in m.ranker_features if f not in _known_ranker_inputs(m)]
    if missing:
        raise ArtifactError(f"{MANIFEST}: ranker features {missing} are neither user nor item features")


def _csr_arrays(a: ModelArtifact) -> tuple[tuple[str, np.ndarray, tuple[tuple[str, np.ndarray], ...]], ...]:
    """(pointer file, pointers, the arrays they index) of each CSR structure of the artifact."""
    return (
        (SEEN_INDPTR, a.seen_indptr,
         ((SEEN_INDICES, a.seen_indices), (SEEN_TIMESTAMPS, a.seen_timestamps),
          (SEEN_RATING_SUMS, a.seen_rating_sums))),
        (ITEM_TIMELINE_INDPTR, a.item_timeline_indptr,
         ((ITEM_TIMELINE_TIMESTAMPS, a.item_timeline_timestamps),
          (ITEM_TIMELINE_RATING_SUMS, a.item_timeline_rating_sums))),
        (NEIGHBOUR_INDPTR, a.neighbour_indptr,
         ((NEIGHBOUR_ITEMS, a.neighbour_items), (NEIGHBOUR_SCORES, a.neighbour_scores))),
    )


def _check_values(a: ModelArtifact) -> None:
    """What every lookup relies on and only a pass over the arrays shows (see :func:`load_artifact`)."""
    m = a.manifest
    for indptr_name, indptr, _ in _csr_arrays(a):
        if len(indptr) and (int(indptr[0]) != 0 or np.any(np.diff(indptr) < 0)):
            raise ArtifactError(f"{a.path / indptr_name}: not increasing from 0")
    for indptr_name, indptr, times, times_name in (
        (SEEN_INDPTR, a.seen_indptr, a.seen_timestamps, SEEN_TIMESTAMPS),
        (ITEM_TIMELINE_INDPTR, a.item_timeline_indptr, a.item_timeline_timestamps, ITEM_TIMELINE_TIMESTAMPS),
    ):
        falls = np.flatnonzero(np.diff(times) < 0) + 1  # a fall is allowed only where a new row starts
        if len(falls) and not np.isin(falls, indptr).all():
            raise ArtifactError(f"{a.path / times_name}: not in time order within each row of {indptr_name}")
        if len(times) and int(times.max()) >= m.data_end:
            raise ArtifactError(f"{a.path / times_name}: an interaction at or after the manifest's data_end {m.data_end}")
    for name, index_array in (
        (SEEN_INDICES, a.seen_indices),
        (POPULAR_ITEMS, a.popular_items),
        (NEIGHBOUR_ITEMS, a.neighbour_items),
    ):
        if len(index_array) and (int(index_array.min()) < 0 or int(index_array.max()) >= m.n_items):
            raise ArtifactError(f"{a.path / name}: item index out of range [0, {m.n_items})")


def _known_ranker_inputs(m: Manifest) -> set[str]:
    from twostage_rec.schema import CANDIDATE_FEATURES

    return {*CANDIDATE_FEATURES, *m.user_feature_names, *m.item_feature_names}


def _load_array(path: Path, dtype: type | None = None) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        raise ArtifactError(f"{path}: not a readable .npy file ({exc})") from None
    expected = dtype or _DTYPES[path.name]
    if array.dtype != expected:
        raise ArtifactError(f"{path}: dtype {array.dtype}, expected {np.dtype(expected)}")
    return array


def load_ids(model_dir: Path, kind: str) -> IdTable:
    """Just the ``"user"`` or ``"item"`` ids of a model directory (without loading the rest)."""
    files = {"user": USER_ID_FILES, "item": ITEM_ID_FILES}[kind]
    return _id_table(Path(model_dir), {name: _load_array(Path(model_dir) / name) for name in files}, files)


def _id_table(model_dir: Path, arrays: Mapping[str, np.ndarray], files: Sequence[str], scan: bool = True) -> IdTable:
    """An id table from its four arrays, checked so that every lookup stays inside them (``scan``:
    also the values, a pass over every id; see :func:`load_artifact`)."""
    data, offsets, hashes, order = (arrays[name] for name in files)
    n = len(offsets) - 1
    bounded = offsets.ndim == 1 and n >= 0 and int(offsets[0]) == 0 and int(offsets[-1]) == len(data)
    if not bounded or (scan and np.any(np.diff(offsets) < 0)):
        raise ArtifactError(f"{model_dir / files[1]}: offsets must rise from 0 to the {len(data)} bytes of ids")
    if hashes.shape != (n,) or order.shape != (n,):
        raise ArtifactError(f"{model_dir / files[2]}: {len(hashes)} hashes / {len(order)} positions for {n} ids")
    if scan and n and (np.any(hashes[1:] < hashes[:-1]) or int(order.min()) < 0 or int(order.max()) >= n):
        raise ArtifactError(f"{model_dir / files[3]}: hashes not sorted or positions out of range")
    return IdTable(IdTableArrays(data, offsets, hashes, order))


def _write_json(path: Path, body: Any) -> None:
    path.write_text(json.dumps(body, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
