"""SageMaker Feature Store setup and ingestion of the artifact's item features.

``create_item_feature_group`` uses the ``sagemaker`` control-plane client;
``ingest_items`` writes one record per item with ``sagemaker-featurestore-runtime`` ``put_record``
(bounded concurrency, standard retries, a progress bar). Values travel as strings; missing values
are left out of the record (Feature Store allows absent non-key features).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from tqdm import tqdm

from twostage_rec import schema
from twostage_rec.artifact import ModelArtifact
from twostage_rec.features import feature_store_name


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
    name = fs.feature_group_name
    try:
        status = sagemaker_client.describe_feature_group(FeatureGroupName=name)["FeatureGroupStatus"]
    except sagemaker_client.exceptions.ResourceNotFound:
        kwargs: dict[str, Any] = {
            "FeatureGroupName": name,
            "RecordIdentifierFeatureName": fs.record_identifier_name,
            "EventTimeFeatureName": fs.event_time_feature_name,
            "FeatureDefinitions": feature_definitions(artifact),
            "OnlineStoreConfig": {"EnableOnlineStore": True},
            "Description": f"item features for model {artifact.manifest.model_version}",
        }
        if role_arn:
            kwargs["RoleArn"] = role_arn
        sagemaker_client.create_feature_group(**kwargs)
        status = "Creating"
    deadline = time.monotonic() + wait_s
    while status == "Creating" and time.monotonic() < deadline:
        time.sleep(2)
        status = sagemaker_client.describe_feature_group(FeatureGroupName=name)["FeatureGroupStatus"]
    if status != "Created":
        raise RuntimeError(f"feature group {name} is {status}, not Created")
    return name


def item_records(artifact: ModelArtifact, event_time: str | None = None) -> list[list[dict[str, str]]]:
    """One Feature Store record per item from the artifact's snapshot."""
    fs = artifact.manifest.feature_store
    when = event_time or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
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
            value = float(matrix[idx, col])
            if math.isnan(value):
                continue
            fs_name = feature_store_name(name)
            kind = fs.feature_types[fs_name]
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


def make_clients(region: str, endpoint_url: str | None = None, max_attempts: int = 5) -> tuple[Any, Any]:
    """(sagemaker, sagemaker-featurestore-runtime) clients with explicit region and retries."""
    import boto3
    from botocore.config import Config

    config = Config(region_name=region, retries={"mode": "standard", "total_max_attempts": max_attempts})
    session = boto3.session.Session()
    extra = {"endpoint_url": endpoint_url} if endpoint_url else {}
    return (
        session.client("sagemaker", config=config, **extra),
        session.client("sagemaker-featurestore-runtime", config=config, **extra),
    )
