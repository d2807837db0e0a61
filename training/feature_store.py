"""SageMaker Feature Store setup: the item feature group and the user-history group.

``create_item_feature_group`` / ``create_user_history_group`` use the ``sagemaker`` control-plane
client; ``ingest_items`` writes one record per item with ``sagemaker-featurestore-runtime``
``put_record`` (bounded concurrency, standard retries, a progress bar). Values travel as strings;
missing values are left out of the record (Feature Store allows absent non-key features).
``seed_user_histories`` merges each user's training history into their record
(``training.events``), so re-seeding never drops events recorded since.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from tqdm import tqdm

from training.events import RecordReport, seed_histories
from twostage_rec import schema
from twostage_rec.artifact import Manifest, ModelArtifact, UserHistorySchema
from twostage_rec.features import feature_store_name
from twostage_rec.history_store import HistoryEvent, artifact_user_history


def feature_definitions(artifact: ModelArtifact) -> list[dict[str, str]]:
    fs = artifact.manifest.feature_store
    defs = [
        {"FeatureName": fs.record_identifier_name, "FeatureType": "String"},
        {"FeatureName": fs.event_time_feature_name, "FeatureType": "String"},
    ]
    defs += [{"FeatureName": name, "FeatureType": kind} for name, kind in fs.feature_types.items()]
    return defs


def create_item_feature_group(
    sagemaker_client: Any, artifact: ModelArtifact, role_arn: str | None = None, wait_s: float = 300.0
) -> str:
    """Create the online item feature group if it does not exist; wait until it is Created."""
    fs = artifact.manifest.feature_store
    return create_feature_group(
        sagemaker_client, fs.feature_group_name, fs.record_identifier_name, fs.event_time_feature_name,
        feature_definitions(artifact), f"item features for model {artifact.manifest.model_version}",
        role_arn, wait_s,
    )


def user_history_schema(manifest: Manifest, group_name: str | None = None) -> UserHistorySchema:
    """The user-history group's layout: the manifest's, named ``group_name`` when given.

    A manifest without one gets the default layout, named after the item group
    (``ml-100k-items`` -> ``ml-100k-user-history``).
    """
    schema = manifest.user_history
    if schema is None:
        item_group = manifest.feature_store.feature_group_name
        schema = UserHistorySchema(f"{item_group.removesuffix('-items')}-user-history")
    return replace(schema, feature_group_name=group_name) if group_name else schema


def create_user_history_group(
    sagemaker_client: Any, schema: UserHistorySchema, role_arn: str | None = None, wait_s: float = 300.0
) -> str:
    """Create the online user-history group if it does not exist; wait until it is Created.

    No TTL: the event time of a history record is a version counter (see ``training.events``).
    """
    definitions = [
        {"FeatureName": schema.record_identifier_name, "FeatureType": "String"},
        {"FeatureName": schema.event_time_feature_name, "FeatureType": "Fractional"},
        {"FeatureName": schema.item_ids_feature_name, "FeatureType": "String"},
        {"FeatureName": schema.timestamps_feature_name, "FeatureType": "String"},
    ]
    return create_feature_group(
        sagemaker_client, schema.feature_group_name, schema.record_identifier_name,
        schema.event_time_feature_name, definitions, "users' recent interactions (JSON lists, oldest first)",
        role_arn, wait_s,
    )


def create_feature_group(
    sagemaker_client: Any,
    name: str,
    record_identifier_name: str,
    event_time_feature_name: str,
    definitions: list[dict[str, str]],
    description: str,
    role_arn: str | None = None,
    wait_s: float = 300.0,
) -> str:
    """Create an online-store feature group unless it exists; wait until it is Created."""
    try:
        status = sagemaker_client.describe_feature_group(FeatureGroupName=name)["FeatureGroupStatus"]
    except sagemaker_client.exceptions.ResourceNotFound:
        kwargs: dict[str, Any] = {
            "FeatureGroupName": name,
            "RecordIdentifierFeatureName": record_identifier_name,
            "EventTimeFeatureName": event_time_feature_name,
            "FeatureDefinitions": definitions,
            "OnlineStoreConfig": {"EnableOnlineStore": True},
            "Description": description,
        }
        if role_arn:
            kwargs["RoleArn"] = role_arn
        sagemaker_client.create_feature_group(**kwargs)
        # Asked at once, not after a first poll interval: SageMaker answers Creating for a while,
        # a local Feature Store Created at once (the demo waited 2 s a group for nothing).
        status = sagemaker_client.describe_feature_group(FeatureGroupName=name)["FeatureGroupStatus"]
    deadline = time.monotonic() + wait_s
    while status == "Creating" and time.monotonic() < deadline:
        time.sleep(2)
        status = sagemaker_client.describe_feature_group(FeatureGroupName=name)["FeatureGroupStatus"]
    if status != "Created":
        raise RuntimeError(f"feature group {name} is {status}, not Created")
    return name


def artifact_histories(artifact: ModelArtifact) -> Iterator[tuple[str, list[HistoryEvent]]]:
    """Every user's last ``history_length`` training interactions, oldest first, from the artifact."""
    for user_idx, user_id in enumerate(artifact.user_ids):
        yield user_id, artifact_user_history(artifact, user_idx)


def seed_user_histories(
    runtime_client: Any, artifact: ModelArtifact, schema: UserHistorySchema, concurrency: int = 8,
    show_progress: bool = True,
) -> RecordReport:
    """Merge every user's training history into the user-history group (never drops newer events)."""
    return seed_histories(runtime_client, schema, artifact_histories(artifact), artifact.manifest.history_length,
                          concurrency=concurrency, show_progress=show_progress)


def item_records(artifact: ModelArtifact, event_time: str | None = None) -> list[list[dict[str, str]]]:
    """One Feature Store record per item from the artifact's snapshot: the features of the group's
    schema (what does not change with time; the rest is computed at each request's as_of)."""
    fs = artifact.manifest.feature_store
    # Milliseconds: the online store keeps a record only for a strictly newer event time, so a
    # re-ingest within the same second would otherwise be ignored.
    when = event_time or datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    names = artifact.manifest.item_feature_names
    categories = artifact.manifest.categories
    matrix = artifact.item_features
    records = []
    for idx, item_id in enumerate(artifact.item_ids):
        record = [
            {"FeatureName": fs.record_identifier_name, "ValueAsString": item_id},
            {"FeatureName": fs.event_time_feature_name, "ValueAsString": when},
        ]
        for col, name in enumerate(names):
            fs_name = feature_store_name(name)
            kind = fs.feature_types.get(fs_name)
            value = float(matrix[idx, col])
            if kind is None or math.isnan(value):  # time-dependent: computed at each request's as_of
                continue
            if fs_name == schema.CATEGORY:
                text = categories[int(value)]
            elif kind == "Integral":
                text = str(int(round(value)))
            else:
                text = repr(value)
            record.append({"FeatureName": fs_name, "ValueAsString": text})
        records.append(record)
    return records


def ingest_items(
    runtime_client: Any, artifact: ModelArtifact, concurrency: int = 8, show_progress: bool = True
) -> int:
    """Put every item's record; the client's retry policy handles throttling. Returns the count."""
    group = artifact.manifest.feature_store.feature_group_name
    records = item_records(artifact)

    def put(record: list[dict[str, str]]) -> None:
        runtime_client.put_record(FeatureGroupName=group, Record=record)

    with ThreadPoolExecutor(max_workers=concurrency) as pool, tqdm(
        total=len(records), desc=f"ingest {group}", unit="rec", disable=not show_progress
    ) as bar:
        for _ in pool.map(put, records):
            bar.update()
    return len(records)


def make_clients(
    region: str, endpoint_url: str | None = None, max_attempts: int = 5, concurrency: int = 8
) -> tuple[Any, Any]:
    """(sagemaker, sagemaker-featurestore-runtime) clients with explicit region and retries.

    ``concurrency`` sizes the connection pool for that many threads sharing a client.
    """
    import boto3
    from botocore.config import Config

    config = Config(region_name=region, retries={"mode": "standard", "total_max_attempts": max_attempts},
                    max_pool_connections=max(10, concurrency))
    session = boto3.session.Session()
    extra = {"endpoint_url": endpoint_url} if endpoint_url else {}
    return (
        session.client("sagemaker", config=config, **extra),
        session.client("sagemaker-featurestore-runtime", config=config, **extra),
    )
