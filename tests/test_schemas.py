"""Topic records stay readable: stored sample records of every ``schema_version`` still parse with the current
models (a breaking change of a record fails here), and the JSON Schema files match the models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas import generate
from schemas.records import SCHEMA_MODELS

GOLDEN = Path(__file__).resolve().parent / "golden"
SAMPLE = re.compile(r"^(?P<name>[a-z_]+)\.v(?P<version>\d+)\.json$")
SAMPLES = sorted(GOLDEN.glob("*.json"))


def current_version(name: str) -> int:
    return int(SCHEMA_MODELS[name].model_fields["schema_version"].default)


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_stored_sample_still_parses(path: Path) -> None:
    m = SAMPLE.match(path.name)
    assert m, f"{path.name}: golden samples are named <record>.v<schema_version>.json"
    name, version = m["name"], int(m["version"])
    assert name in SCHEMA_MODELS, f"{path.name}: no record model {name!r} (was it renamed?)"
    data = json.loads(path.read_text())
    assert data["schema_version"] == version
    record = SCHEMA_MODELS[name].model_validate(data)  # the stored record, read by today's reader
    if version == current_version(name):  # and a current record round-trips unchanged (fields added since, with
        # defaults, are left out: the sample does not set them)
        assert json.loads(record.model_dump_json(exclude_unset=True)) == data


def test_every_current_schema_version_has_a_sample() -> None:
    have = {(m["name"], int(m["version"])) for p in SAMPLES if (m := SAMPLE.match(p.name))}
    missing = sorted(f"{n}.v{current_version(n)}.json" for n in SCHEMA_MODELS if (n, current_version(n)) not in have)
    assert not missing, f"add golden samples to tests/golden/ for: {', '.join(missing)}"


def test_models_reject_unknown_fields_and_other_versions() -> None:
    data = json.loads((GOLDEN / "raw_turn.v1.json").read_text())
    with pytest.raises(ValidationError):
        SCHEMA_MODELS["raw_turn"].model_validate({**data, "surprise": 1})
    with pytest.raises(ValidationError):
        SCHEMA_MODELS["raw_turn"].model_validate({**data, "schema_version": 99})


def test_json_schema_files_are_up_to_date() -> None:
    stale = generate.stale()
    assert not stale, f"stale JSON schemas: {', '.join(stale)} (run python -m schemas.generate)"
