"""R5: 50 users (and two tenants, as the service scopes them: ``<tenant>:<user>``), randomized searches in every
mode with and without time filters: every hit belongs to the user asked for — 0 foreign memories — and every
memory a user owns is reachable by their own searches only."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from schemas.records import RawTurn
from streams import ids
from streams.api import Memory
from streams.settings import Settings, STMSettings
from streams.stages import Stages

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(900)]

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
TOPICS = [
    "cat named Miso",
    "trip to Lisbon",
    "marathon training",
    "piano lessons",
    "new job at the bank",
    "sister's wedding",
    "vegan recipes",
    "broken laptop",
    "garden tomatoes",
    "chess club",
]


def users() -> list[str]:
    plain = [f"user-{i}" for i in range(40)]
    tenants = [f"{t}:user-{i}" for t in ("acme", "globex") for i in range(5)]  # the same user names, two tenants
    return plain + tenants


def turns_of(user: str, rng: random.Random) -> list[RawTurn]:
    out = []
    for seq, topic in enumerate(rng.sample(TOPICS, 4)):
        out.append(
            RawTurn(
                turn_id=ids.turn_id(user, "s1", seq),
                user_id=user,
                session_id="s1",
                seq=seq,
                role="user",
                content=f"I keep thinking about my {topic}; {user} told everyone about the {topic} today.",
                timestamp=T0 + timedelta(days=seq),
            )
        )
    return out


def test_r5_no_foreign_memory_in_any_search(tmp_path: Path, encoder: Any) -> None:
    rng = random.Random(5)
    settings = Settings(data_dir=tmp_path / "state", stm=STMSettings(threshold_tokens=64))
    everyone = users()
    with Memory(settings, stages=Stages(settings, encoder=encoder)) as m:
        for u in everyone:
            m.add_turns(turns_of(u, rng))
        m.flush()
        owned = {u: {r.memory_id for r in m.get_all(u)} for u in everyone}
        assert all(owned.values()), "every user has memories"
        all_ids = [i for ids_ in owned.values() for i in ids_]
        assert len(all_ids) == len(set(all_ids)), "two users share a memory id"
        searches = foreign = hits_total = 0
        for _ in range(300):
            u = rng.choice(everyone)
            other = rng.choice(everyone)
            query = rng.choice([rng.choice(TOPICS), f"what did {other} say?", other, "today"])
            mode = rng.choice(["hybrid", "dense", "sparse"])
            window = rng.choice([None, (T0, T0 + timedelta(days=2))])
            hits = m.search(
                query,
                user_id=u,
                limit=rng.choice([1, 5, 20]),
                mode=mode,  # type: ignore[arg-type]
                time_from=window[0] if window else None,
                time_to=window[1] if window else None,
            )
            searches += 1
            hits_total += len(hits)
            foreign += sum(1 for h in hits if h.record.user_id != u or h.record.memory_id not in owned[u])
        print(f"R5 users={len(everyone)} searches={searches} hits={hits_total} foreign={foreign}")
        assert foreign == 0
        assert hits_total > 0
