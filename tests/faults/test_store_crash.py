"""R6: the store's owner dies mid-write.

- Embedded: ``lightmem ingest`` (the process that owns the embedded store) is SIGKILLed while it writes; the store
  reopens, holds only memories of the clean run (nothing torn or foreign), and ingesting the same input again
  ends with exactly the clean run's memory ids (ids are deterministic: the rerun fills what the crash cut off).
- A store that refuses writes for a stretch (what an unavailable Qdrant server looks like to the sink) is
  ``test_sink_backpressure.py``; a run against a real server is not part of this suite yet.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from streams.api import Memory
from streams.settings import Settings
from tests.conftest_kafka import LIGHTMEM

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(900)]


def write_input(path: Path, conversations: Any, n_users: int = 3, sessions: int = 2) -> list[str]:
    users = []
    with path.open("w") as f:
        for conv in conversations[:n_users]:
            keep = list(dict.fromkeys(t.session_id for t in conv.turns))[:sessions]
            for t in conv.turns:
                if t.session_id in keep:
                    f.write(
                        json.dumps(
                            {
                                "user_id": t.user_id,
                                "session_id": t.session_id,
                                "seq": t.seq,
                                "role": t.role,
                                "speaker": t.speaker,
                                "content": t.content,
                                "timestamp": t.timestamp.isoformat(),
                            }
                        )
                        + "\n"
                    )
            users.append(conv.user_id)
    return users


def ingest_cmd(data_dir: Path, path: Path) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTMEM_")}
    env.update(
        {
            "LIGHTMEM_DATA_DIR": str(data_dir),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "LIGHTMEM_STM__THRESHOLD_TOKENS": "128",
        }
    )
    return [str(LIGHTMEM), "ingest", str(path)], env


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def memories(data_dir: Path, users: list[str]) -> dict[str, str]:
    s = Settings(data_dir=data_dir)
    with Memory(s) as m:
        return {r.memory_id: r.text for u in users for r in m.get_all(u)}


def kill_mid_write(cmd: list[str], env: dict[str, str], log_path: Path, after_s: float) -> None:
    """Start the ingest and SIGKILL its process group ``after_s`` seconds later (if it still runs)."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(after_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_r6_embedded_owner_killed_mid_write(tmp_path: Path, locomo_conversations: Any) -> None:
    path = tmp_path / "turns.jsonl"
    users = write_input(path, locomo_conversations)
    clean_dir = crash_dir = tmp_path / "clean"
    cmd, env = ingest_cmd(clean_dir, path)
    started = time.monotonic()
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    clean_s = time.monotonic() - started  # model loading, then writes spread over the ingest's chunks
    clean = memories(clean_dir, users)
    assert len(clean) > 20
    after_crash: dict[str, str] = {}
    lo, hi = 0.0, 1.0  # the kill point as a fraction of the clean run's duration, narrowed after each try
    for attempt in range(10):
        # the kill must land while the owner writes; the clean run's duration is only a guide (it also exported
        # the ONNX encoder, a busy machine is slower), so a try that killed too late or too early narrows the window
        fraction = (lo + hi) / 2
        crash_dir = tmp_path / f"crash{attempt}"
        cmd, env = ingest_cmd(crash_dir, path)
        kill_mid_write(cmd, env, tmp_path / f"crash{attempt}.log", fraction * clean_s)
        after_crash = memories(crash_dir, users)  # the store reopens
        assert set(after_crash) <= set(clean) and all(after_crash[k] == clean[k] for k in after_crash)
        if 0 < len(after_crash) < len(clean):
            break
        if after_crash:
            hi = fraction
        else:
            lo = fraction
    assert 0 < len(after_crash) < len(clean), "the kill did not land mid-ingest in ten tries"
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    final = memories(crash_dir, users)
    print(f"R6 memories clean={len(clean)} after_crash={len(after_crash)} after_rerun={len(final)}")
    assert final == clean
