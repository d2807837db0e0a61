"""A local SageMaker Feature Store that unmodified boto3 talks to.

Serves the ``sagemaker-featurestore-runtime`` API (GetRecord, BatchGetRecord, PutRecord,
DeleteRecord) and the FeatureGroup part of the ``sagemaker`` API (Create/Describe/Delete/List) on
one port, keeps state in SQLite, and injects faults on demand. Start it with
``python -m local_test.feature_store serve --port 0 --db fs.sqlite``; from tests use
``local_test.feature_store.testing.FeatureStoreServer``.
"""
