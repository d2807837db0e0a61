"""Stage 1 from a model artifact: its candidate sources, the merger and the feature builder."""

from __future__ import annotations

from typing import Any

import numpy as np

from twostage_rec import schema
from twostage_rec.artifact import ArtifactError, ModelArtifact
from twostage_rec.candidate_features import CandidateFeatureBuilder
from twostage_rec.retrieval import make_retriever
from twostage_rec.sequence_encoder import EncoderSpec, SequenceEncoder
from twostage_rec.settings import Settings
from twostage_rec.sources import CandidateSource
from twostage_rec.sources.merge import DEFAULT_FUSION_K, CandidateMerger, PopularItems
from twostage_rec.sources.mf import MatrixFactorizationSource
from twostage_rec.sources.neighbours import ItemNeighbourSource, NeighbourLists
from twostage_rec.sources.sequence import SequenceSource
from twostage_rec.timelines import PointInTimeFeatures, Timeline

FUSION = "fusion"  # the manifest's sources entry holding the merger's k


def neighbour_lists(artifact: ModelArtifact) -> NeighbourLists:
    return NeighbourLists(
        plain(artifact.neighbour_indptr), plain(artifact.neighbour_items), plain(artifact.neighbour_scores)
    )


def plain(array: np.ndarray) -> np.ndarray:
    """A plain ndarray view of a memory map: same shared pages, without np.memmap's Python-level
    hook on every slice (measured: ~10 us per index, thousands per batch)."""
    return np.asarray(array)


def make_sources(artifact: ModelArtifact, settings: Settings) -> list[CandidateSource]:
    """Every source the model has, in the manifest's order."""
    config = artifact.manifest.sources
    meta = artifact.manifest.extra
    sources: list[CandidateSource] = []
    if schema.SOURCE_MF in config:
        retriever = make_retriever(artifact.item_factors, artifact.ann_index, meta.get("ann"), settings, "MF")
        sources.append(MatrixFactorizationSource(plain(artifact.user_factors), plain(artifact.item_factors), retriever))
    if schema.SOURCE_NEIGHBOURS in config:
        own = config[schema.SOURCE_NEIGHBOURS]
        sources.append(
            ItemNeighbourSource(neighbour_lists(artifact), int(own.get("recent", 20)), float(own.get("decay", 0.7)))
        )
    if schema.SOURCE_SEQUENCE in config:
        if artifact.sequence_graph is None or artifact.sequence_item_vectors is None:
            raise ArtifactError("the manifest lists a sequence source but the artifact has no sequence model")
        encoder = sequence_encoder(artifact)
        retriever = make_retriever(
            artifact.sequence_item_vectors, artifact.sequence_ann_index, meta.get("sequence_ann"), settings, "sequence"
        )
        sources.append(SequenceSource(encoder, plain(artifact.sequence_item_vectors), retriever))
    return sources


def sequence_encoder(artifact: ModelArtifact) -> SequenceEncoder:
    assert artifact.manifest.sequence_model is not None and artifact.sequence_graph is not None
    try:
        spec = EncoderSpec.from_manifest(artifact.manifest.sequence_model)
        return SequenceEncoder(artifact.sequence_graph, spec, plain(artifact.sequence_item_vectors))  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"sequence model: {exc}") from None


def make_merger(artifact: ModelArtifact) -> CandidateMerger:
    config = artifact.manifest.sources
    weights = {name: float(own.get("weight", 1.0)) for name, own in config.items() if name != FUSION}
    k = float(config.get(FUSION, {}).get("k", DEFAULT_FUSION_K))
    return CandidateMerger(weights, PopularItems(artifact.popular_items), artifact.manifest.n_items, k)


def make_feature_builder(artifact: ModelArtifact) -> CandidateFeatureBuilder:
    m = artifact.manifest
    vectors: Any = artifact.sequence_item_vectors
    if vectors is None:
        vectors = artifact.item_factors[:, 2:]  # the MF embedding without the folded biases
    names = m.item_feature_names
    category = (
        np.ascontiguousarray(artifact.item_features[:, names.index(schema.CATEGORY_CODE)], dtype=np.float32)
        if schema.CATEGORY_CODE in names
        else None
    )
    return CandidateFeatureBuilder(
        m.ranker_features,
        m.user_feature_names,
        m.item_feature_names,
        neighbour_lists(artifact),
        plain(vectors),
        category,
        m.gap_cap_hours,
    )


def make_point_in_time(artifact: ModelArtifact) -> PointInTimeFeatures:
    """The point-in-time user and item features over the artifact's timelines."""
    m = artifact.manifest
    users = Timeline(plain(artifact.seen_indptr), plain(artifact.seen_timestamps), plain(artifact.seen_rating_sums))
    items = Timeline(
        plain(artifact.item_timeline_indptr),
        plain(artifact.item_timeline_timestamps),
        plain(artifact.item_timeline_rating_sums),
    )
    return PointInTimeFeatures(users, items, m.data_end, m.user_feature_names, m.item_feature_names)
