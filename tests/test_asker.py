"""Whom a question is about (streams.asker) and how search prefers the asker's own turns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from streams.asker import asker_roles


@pytest.mark.parametrize(
    "query",
    [
        "What kitchen appliance did I buy 10 days ago?",
        "How many bikes do I own?",
        "What did I bake for my niece's birthday party?",
        "i've been sneezing lately, is it my cat?",
        "Remind me where the spare key is",
    ],
)
def test_a_first_person_question_is_about_the_user(query: str) -> None:
    assert asker_roles(query) == ("user",)


@pytest.mark.parametrize(
    "query",
    [
        "What did you suggest for my trip to Norway?",  # addresses the other side too
        "Can you remind me of your list of museums?",
        "What did Caroline research?",  # third person: named people, not the user role
        "When is the deadline?",
        "Is it Iceland or Ireland?",  # "I" only inside words
    ],
)
def test_other_questions_prefer_nobody(query: str) -> None:
    assert asker_roles(query) is None


@pytest.mark.slow
def test_search_ranks_what_the_user_said_above_the_assistant_on_the_same_subject(tmp_path, encoder) -> None:  # noqa: ANN001
    """The assistant's long answer matches "kitchen appliance" best; the user's own turn says what they bought.
    A first-person question lifts the user's turn; nothing is dropped; the switch turns it off."""
    from streams.api import Memory
    from streams.settings import Settings, STMSettings, StoreSettings
    from streams.stages import Stages

    def ask(prefer_asker: bool, *queries: str) -> list[list[str]]:
        settings = Settings(
            data_dir=tmp_path / f"state-{prefer_asker}",
            stm=STMSettings(threshold_tokens=64),
            store=StoreSettings(path=tmp_path / f"q-{prefer_asker}", prefer_asker=prefer_asker),
        )
        when = datetime(2024, 3, 15, 18, 0, tzinfo=UTC)
        with Memory(settings, stages=Stages(settings, encoder=encoder)) as m:
            m.add(
                [
                    {"role": "user", "content": "I just got a smoker today for the backyard."},
                    {
                        "role": "assistant",
                        "content": "Kitchen appliances to consider: a stand mixer, a food processor, an air fryer "
                        "and a slow cooker are the kitchen appliances most people buy first.",
                    },
                ],
                user_id="ada",
                session_id="s1",
                timestamp=when,
            )
            m.flush("ada")
            found = [m.search(q, user_id="ada", limit=5, as_of=when + timedelta(days=10)) for q in queries]
        return [[h.record.source_turns[0].role for h in hits if h.record.kind == "fact"] for hits in found]

    q = "Which kitchen appliance did I buy?"
    assert ask(False, q) == [["assistant", "user"]]  # the plain ranking
    assert ask(True, q, "Which kitchen appliance did you list?") == [
        ["user", "assistant"],  # preferred, not filtered
        ["assistant", "user"],  # a question to the other side: the plain ranking
    ]
