"""Settings: every option in one model, read from LIGHTMEM_*; the store follows data_dir; to_env round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from streams.settings import Settings, SinkSettings, StoreSettings, WorkerSettings, to_env


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("LIGHTMEM_"):
            monkeypatch.delenv(key)


def test_store_path_follows_data_dir_unless_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(data_dir=tmp_path).store.path == tmp_path / "qdrant"
    assert Settings().store.path == Path(".lightmem") / "qdrant"
    own = tmp_path / "elsewhere"
    assert Settings(data_dir=tmp_path, store=StoreSettings(path=own)).store.path == own
    monkeypatch.setenv("LIGHTMEM_DATA_DIR", str(tmp_path / "d"))
    assert Settings().store.path == tmp_path / "d" / "qdrant"
    monkeypatch.setenv("LIGHTMEM_STORE__PATH", str(own))
    assert Settings().store.path == own
    assert Settings(data_dir=tmp_path).store.path == own  # an explicit store path wins over --data-dir


def test_worker_sink_and_log_level_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().worker == WorkerSettings() and Settings().sink == SinkSettings()
    monkeypatch.setenv("LIGHTMEM_WORKER__WEB_PORT", "6066")
    monkeypatch.setenv("LIGHTMEM_WORKER__SESSION_TIMEOUT_S", "30")
    monkeypatch.setenv("LIGHTMEM_SINK__BATCH_MAX", "17")
    monkeypatch.setenv("LIGHTMEM_SINK__HEARTBEAT_FILE", "/tmp/beat")
    monkeypatch.setenv("LIGHTMEM_LOG_LEVEL", "debug")
    s = Settings()
    assert (s.worker.web_port, s.worker.session_timeout_s, s.worker.tick_s) == (6066, 30.0, None)
    assert (s.sink.batch_max, s.sink.heartbeat_file, s.log_level) == (17, Path("/tmp/beat"), "debug")
    monkeypatch.setenv("LIGHTMEM_LOG_LEVEL", "loud")
    with pytest.raises(ValidationError):
        Settings()


def test_to_env_rebuilds_the_same_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings.model_validate(
        {
            "data_dir": tmp_path,
            "llm": {"base_url": "http://127.0.0.1:1/v1", "api_key": "secret", "max_concurrency": 2},
            "sleep": {"kinds": ["fact", "summary"], "timezone": "Europe/Berlin"},
            "segmentation": {"attention_layers": [0, 2]},
            "kafka": {"topics": {"raw_turns": "x.raw"}},
            "worker": {"web_port": 6066},
            "sink": {"idle_exit_s": 1.5},
            "log_level": "warning",
        }
    )
    env = to_env(s)
    assert env["LIGHTMEM_LLM__API_KEY"] == "secret" and env["LIGHTMEM_KAFKA__TOPICS__RAW_TURNS"] == "x.raw"
    assert "LIGHTMEM_EMBEDDING__MODEL" not in env  # unset optional fields stay unset
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    again = Settings()
    assert again == s
    assert again.llm.api_key.get_secret_value() == "secret"
