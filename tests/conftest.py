"""Shared fixtures. Models load from disk only (HF_HUB_OFFLINE)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tests.conftest_kafka import kafka_bootstrap, kafka_env, llm_proc, make_kafka_env  # noqa: E402,F401
from tests.fixtures_llm import llm, llm_server  # noqa: E402,F401


def _data_dir() -> Path:
    """Benchmark data: $LIGHTMEM_TEST_DATA, else ../shared/data beside the repo, else /work/shared/data."""
    candidates = [os.environ.get("LIGHTMEM_TEST_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data"]
    for c in [*candidates, "/work/shared/data"]:
        if c and (Path(c) / "locomo10_dev.json").exists():
            return Path(c)
    return Path("/work/shared/data")


DATA_DIR = _data_dir()
LOCOMO_DEV = DATA_DIR / "locomo10_dev.json"
LME_S_DEV = DATA_DIR / "longmemeval_s_dev.json"


@pytest.fixture(scope="session")
def encoder():
    from streams.encoder import load_encoder
    from streams.settings import EmbeddingSettings

    return load_encoder(EmbeddingSettings())


@pytest.fixture(scope="session")
def locomo_conversations():
    from streams.loaders import load_locomo

    if not LOCOMO_DEV.exists():
        pytest.fail(f"benchmark data missing at {LOCOMO_DEV} (see the README's data section)")
    return load_locomo(LOCOMO_DEV)
