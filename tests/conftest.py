from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention tiny model shared by the whole session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
