"""The ``lightmem`` command line: a thin layer over ``Memory`` and ``Settings``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streams.cli import app
from streams.cli.common import load_settings, override

ROOT = Path(__file__).resolve().parent.parent


def test_the_command_line_starts_without_the_models_or_kafka() -> None:
    code = (
        "import sys; import streams.cli; "
        "heavy = [m for m in ('streams.api', 'openai', 'torch', 'aiokafka', 'faust') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_options_default_from_settings_and_override_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIGHTMEM_STORE__PATH", raising=False)
    monkeypatch.setenv("LIGHTMEM_SINK__BATCH_MAX", "32")
    settings = load_settings(tmp_path)
    assert settings.data_dir == tmp_path and settings.store.path == tmp_path / "qdrant"
    assert override(settings.sink, batch_max=None, batch_ms=None).batch_max == 32  # not given: the setting
    sink = override(settings.sink, batch_max=8, heartbeat_file=tmp_path / "beat")
    assert (sink.batch_max, sink.batch_ms, sink.heartbeat_file) == (8, 500, tmp_path / "beat")
    with pytest.raises(ValueError):
        override(settings.sink, batch_max=0)  # validated like the setting itself


def test_every_option_help_names_its_setting() -> None:
    res = CliRunner().invoke(app, ["sink", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for var in ("LIGHTMEM_SINK__BATCH_MAX", "LIGHTMEM_SINK__HEARTBEAT_FILE", "LIGHTMEM_LOG_LEVEL"):
        assert var in res.stdout, var


def test_search_rejects_bad_input_before_opening_anything(tmp_path: Path) -> None:
    cli = CliRunner()
    for args, message in (
        (["search", "cat"], "--user is required"),
        (["search", "cat", "--user", "a", "--mode", "fuzzy"], "--mode must be"),
        (["search", "cat", "--user", "a", "--since", "2024-01-01T00:00:00"], "timezone offset"),
    ):
        res = cli.invoke(app, [*args, "--data-dir", str(tmp_path)])
        assert res.exit_code == 2 and message in res.stderr, res.output
    assert not (tmp_path / "qdrant").exists()


@pytest.mark.slow
def test_ingest_then_search_through_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("LIGHTMEM_STORE__PATH", "LIGHTMEM_LLM__BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    turns = tmp_path / "turns.jsonl"
    lines = [
        {"user_id": "ada", "session_id": "s1", "role": "user", "content": "I adopted a cat named Miso last week."},
        {"user_id": "ada", "session_id": "s1", "role": "user", "content": "My sister is a nurse in Lyon."},
        {"user_id": "bo", "session_id": "s1", "role": "user", "content": "I play the violin on weekends."},
    ]
    turns.write_text("".join(json.dumps({**x, "timestamp": "2024-05-01T09:00:00+00:00"}) + "\n" for x in lines))
    data = tmp_path / "state"
    cli = CliRunner()
    res = cli.invoke(app, ["ingest", str(turns), "--data-dir", str(data)])
    assert res.exit_code == 0, res.output
    assert "ingested 3 turns for 2 users" in res.stdout and (data / "qdrant").exists()
    res = cli.invoke(app, ["search", "what pet?", "--user", "ada", "--json", "--data-dir", str(data)])
    assert res.exit_code == 0, res.output
    hits = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert hits and {h["user_id"] for h in hits} == {"ada"} and "Miso" in hits[0]["text"]
