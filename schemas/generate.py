"""Generate the JSON Schema files in ``schemas/json/`` from the pydantic models.

Run ``python -m schemas.generate`` (or ``lightmem schemas --write``) after changing a model;
``python -m schemas.generate --check`` exits 1 when a file is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from schemas.records import SCHEMA_MODELS

JSON_DIR = Path(__file__).resolve().parent / "json"


def render() -> dict[str, str]:
    """File name -> JSON text for every model."""
    out: dict[str, str] = {}
    for name, model in SCHEMA_MODELS.items():
        schema = model.model_json_schema()
        out[f"{name}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def stale(json_dir: Path = JSON_DIR) -> list[str]:
    """Names of schema files that are missing, outdated, or no longer generated."""
    wanted = render()
    bad = [n for n, text in wanted.items() if not (json_dir / n).exists() or (json_dir / n).read_text() != text]
    extra = [p.name for p in json_dir.glob("*.schema.json") if p.name not in wanted]
    return sorted(bad + extra)


def write(json_dir: Path = JSON_DIR) -> list[str]:
    json_dir.mkdir(parents=True, exist_ok=True)
    wanted = render()
    for p in json_dir.glob("*.schema.json"):
        if p.name not in wanted:
            p.unlink()
    for name, text in wanted.items():
        (json_dir / name).write_text(text)
    return sorted(wanted)


if __name__ == "__main__":
    if "--check" in sys.argv:
        names = stale()
        if names:
            print("stale JSON schemas (run python -m schemas.generate):", ", ".join(names))
            sys.exit(1)
        print("JSON schemas up to date")
    else:
        print("wrote", len(write()), "schema files to", JSON_DIR)
