"""The Memory facade, embedded and offline (extractive extraction, the offline compaction rule): every operation
the CLI and the service use — add, flush, search, get, history, compact, revert, erase — and lazy model loading."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from streams.api import AmbiguousChange, ChangeNotFound, Memory
from streams.ltm import MissingUserError
from streams.settings import SegmentationSettings, Settings, STMSettings

pytestmark = pytest.mark.slow


def offline_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "state", stm=STMSettings(threshold_tokens=64))


def test_search_loads_neither_the_compressor_nor_the_llm(tmp_path: Path, encoder) -> None:  # noqa: ANN001
    from streams.stages import Stages

    settings = offline_settings(tmp_path)
    with Memory(settings, stages=Stages(settings, encoder=encoder)) as m:
        m.add("I adopted a cat named Miso last week.", user_id="ada", session_id="s1")
        m.flush("ada")
    with Memory(settings, stages=Stages(settings, encoder=encoder)) as m:
        hits = m.search("what pet does ada have?", user_id="ada", limit=3)
        assert hits and "Miso" in hits[0].record.text
        stages = m.pipeline.stages
        assert not stages.loaded("compressor") and not stages.loaded("extractor")
        with pytest.raises(ValueError, match="timezone-aware"):
            m.search("cat", user_id="ada", time_from=datetime(2020, 1, 1))  # noqa: DTZ001 - the error under test
        with pytest.raises(MissingUserError):
            m.search("cat", user_id="")


def test_get_history_compact_revert_and_erase(tmp_path: Path, encoder) -> None:  # noqa: ANN001
    from streams.stages import Stages

    settings = offline_settings(tmp_path)
    with Memory(settings, stages=Stages(settings, encoder=encoder)) as m:
        for session in ("s1", "s2"):  # the same fact twice: the offline rule deletes the older duplicate
            m.add("I adopted a cat named Miso last week.", user_id="ada", session_id=session)
            m.flush("ada")
        m.add("I play the violin on weekends.", user_id="bo", session_id="s1")
        m.flush("bo")
        before = {r.memory_id: r for r in m.get_all("ada")}
        report = m.compact(["ada"], full=True)
        assert report.model and report.actions["delete"] >= 1
        assert m.costs()["compaction"].items == report.cost.items
        deleted = next(c for c in report.changes if c.action == "delete")
        assert deleted.memory_id in before and m.get_all("ada") != list(before.values())

        view = m.get(deleted.memory_id, "ada")
        assert view is not None and view.record is None  # gone from the store, known to the log
        assert [c.change_id for c in view.changes] == [deleted.change_id]
        assert m.history(deleted.memory_id) == view.changes
        assert m.get("no-such-memory", "ada") is None
        assert m.get(deleted.memory_id, "bo") is None  # scoped to the user

        with pytest.raises(ChangeNotFound):
            m.revert("no-such-change")
        with pytest.raises(AmbiguousChange):
            m.revert("")  # every change id starts with the empty prefix
        result = m.revert(deleted.change_id[:12])
        assert result.reverted == deleted and not result.already and result.revert.reverts == deleted.change_id
        restored = m.get(deleted.memory_id, "ada")
        assert restored is not None and restored.record is not None
        assert restored.record.text == before[deleted.memory_id].text
        assert m.revert(deleted.change_id).already  # done once

        m.add("Something still buffered.", user_id="ada", session_id="s3")
        erased = m.erase("ada")
        assert erased.memories >= 1 and erased.changes == len(report.changes) + 1 and erased.watermark
        assert m.get_all("ada") == [] and m.history(deleted.memory_id) == [] and "ada" not in m.users()
        bo = len(m.get_all("bo"))
        assert bo and m.delete_user("bo") == bo and m.users() == []
        assert m.flush().memories == []  # ada's buffered turn went with her


def test_run_idle_flushes_users_past_the_timeout(tmp_path: Path, encoder) -> None:  # noqa: ANN001
    from streams.stages import Stages

    settings = Settings(
        data_dir=tmp_path / "state",
        segmentation=SegmentationSettings(buffer_tokens=16),  # segments reach STM at once
        stm=STMSettings(threshold_tokens=100_000, idle_timeout_s=60),  # where they wait for the idle timeout
    )
    with Memory(settings, stages=Stages(settings, encoder=encoder)) as m:
        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        m.add("I adopted a cat named Miso last week. She sleeps all day.", user_id="ada", timestamp=t0)
        m.add("My sister lives in Lyon and works as a nurse.", user_id="ada", timestamp=t0)
        assert m.get_all("ada") == []
        assert m.run_idle(datetime.now(UTC).timestamp()).memories == []  # not idle yet
        later = m.run_idle(datetime.now(UTC).timestamp() + 3600)
        assert later.memories and m.get_all("ada")
