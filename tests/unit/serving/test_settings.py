"""The request size limit: MAX_REQUEST_BYTES, or a Batch Transform job's MaxPayloadInMB when that is larger."""

from __future__ import annotations

import pytest

from twostage_rec.settings import Settings, SettingsError


@pytest.mark.parametrize(
    ("env", "limit"),
    [
        ({}, 6 << 20),
        ({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "1"}, 6 << 20),  # a smaller job payload never lowers the limit
        ({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "20"}, 20 << 20),
        ({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "20", "MAX_REQUEST_BYTES": "4096"}, 4096),  # an explicit limit wins
    ],
)
def test_the_request_limit_admits_a_transform_jobs_mini_batches(env: dict[str, str], limit: int) -> None:
    assert Settings.from_env(env).max_request_bytes == limit


def test_a_payload_size_sagemaker_would_refuse_is_named() -> None:
    with pytest.raises(SettingsError, match="SAGEMAKER_MAX_PAYLOAD_IN_MB='101': must be between 0 and 100"):
        Settings.from_env({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "101"})
