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


def _wal_bytes(store: Path) -> int:
    """Bytes allocated to the write-ahead logs under ``store`` (the engine preallocates its WAL files sparsely:
    their blocks, not their sizes, grow with each write), tolerating files replaced while counted."""
    total = 0
    for root, _, files in os.walk(store):
        if Path(root).name != "wal":
            continue
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def memories(data_dir: Path, users: list[str]) -> dict[str, str]:
    s = Settings(data_dir=data_dir)
    with Memory(s) as m:
        return {r.memory_id: r.text for u in users for r in m.get_all(u)}


def kill_on_write(cmd: list[str], env: dict[str, str], log_path: Path, store: Path, writes: int) -> bool:
    """Start the ingest and SIGKILL its process group as soon as the store's write-ahead log has grown ``writes``
    times after it was created (each growth a write the owner made); False when the ingest finished first."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        created = last = 0
        seen = 0
        while proc.poll() is None:
            size = _wal_bytes(store)
            if size and not created:
                created = last = size  # the empty store the owner opened
            elif created and size > last:
                last = size
                seen += 1
                if seen >= writes:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
                    return True
            time.sleep(0.005)
        return False


def test_r6_embedded_owner_killed_mid_write(tmp_path: Path, locomo_conversations: Any) -> None:
    path = tmp_path / "turns.jsonl"
    users = write_input(path, locomo_conversations)
    clean_dir = crash_dir = tmp_path / "clean"
    cmd, env = ingest_cmd(clean_dir, path)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    clean = memories(clean_dir, users)
    assert len(clean) > 20
    after_crash: dict[str, str] = {}
    for writes in range(1, 9):
        # the kill lands right after the owner's n-th observed write to the store: early enough that most of the
        # ingest is still to come, late enough (n grows when a try left nothing) that something was written
        crash_dir = tmp_path / f"crash{writes}"
        cmd, env = ingest_cmd(crash_dir, path)
        killed = kill_on_write(cmd, env, tmp_path / f"crash{writes}.log", crash_dir / "qdrant", writes)
        after_crash = memories(crash_dir, users)  # the store reopens
        print(f"R6 try after {writes} write(s): killed={killed} memories={len(after_crash)} of {len(clean)}")
        assert set(after_crash) <= set(clean) and all(after_crash[k] == clean[k] for k in after_crash)
        if killed and 0 < len(after_crash) < len(clean):
            break
    assert 0 < len(after_crash) < len(clean), "the kill did not land mid-ingest"
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    final = memories(crash_dir, users)
    print(f"R6 memories clean={len(clean)} after_crash={len(after_crash)} after_rerun={len(final)}")
    assert final == clean
