"""docs/config.md documents every field the loader reads, with the values it accepts, and the
docs name similarity measures as a config spells them.

The field names come from the loader itself: a config with every table is parsed while each
table reader records the keys it asks for (a reader asks for each field it knows before it
checks for unknown ones) and the choices it accepts. A field added to ``moa_stream/config.py``
then needs only its row in docs/config.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from moa_stream import config as cfg
from moa_stream.engine.staircase import PREFILL_FLAVOURS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIG_MD = (DOCS / "config.md").read_text(encoding="utf-8")

# Every table the loader reads, each present once (an absent sub-table is read too, as empty).
EVERY_TABLE = {
    "providers": {"p": {"kind": "sim"}},
    "agents": {"a": {"provider": "p", "model": "m"}},
    "moa": {"x": {"proposers": ["a"], "aggregator": "a", "staircase": {}}},
    "server": {},
    "sim": {},
}


@dataclass
class Loader:
    #: table (``providers``, ``providers.timeouts``, ``moa.staircase``, "" for the root) ->
    #: the keys its reader asked for
    fields: dict[str, set[str]] = field(default_factory=dict)
    #: (table, key) -> (accepted values, default)
    choices: dict[tuple[str, str], tuple[tuple[str, ...], str]] = field(default_factory=dict)


def _table(path: str) -> str:
    """``providers.NAME.timeouts`` -> ``providers.timeouts``: the names users pick dropped."""
    parts = path.split(".") if path else []
    if parts and parts[0] in ("providers", "agents", "moa"):
        del parts[1:2]
    return ".".join(parts)


@pytest.fixture
def loader(monkeypatch: pytest.MonkeyPatch) -> Loader:
    found = Loader()
    done, choice = cfg._Table.done, cfg._Table.choice

    def recording_done(self: cfg._Table) -> None:
        found.fields.setdefault(_table(self.path), set()).update(self.seen)
        done(self)

    def recording_choice(self: cfg._Table, key: str, choices: Sequence[str], default: str) -> str:
        found.choices[(_table(self.path), key)] = (tuple(choices), default)
        return choice(self, key, choices, default)

    monkeypatch.setattr(cfg._Table, "done", recording_done)
    monkeypatch.setattr(cfg._Table, "choice", recording_choice)
    cfg.parse_config(EVERY_TABLE, "every-table")
    assert set(found.fields) >= {"", "providers", "providers.timeouts", "moa.staircase"}
    return found


def _doc_tables(text: str) -> dict[str, dict[str, str]]:
    """Heading (``[providers.NAME]`` -> ``providers``, ``[moa.ID] staircase`` ->
    ``moa.staircase``) -> field -> its whole table row."""
    tables: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        heading = re.match(r"^#{2,3} `\[([a-z_]+)(?:\.[A-Z]+)?\](?: ([a-z_]+))?`", line)
        if heading:
            name = heading.group(1) + (f".{heading.group(2)}" if heading.group(2) else "")
            current = tables.setdefault(name, {})
        elif line.startswith("#"):
            current = None
        elif current is not None:
            row = re.match(r"^\| `([a-z_.]+)` \|", line)
            if row:
                current[row.group(1)] = line
    return tables


DOC = _doc_tables(CONFIG_MD)


def test_every_field_the_loader_reads_has_a_row(loader: Loader) -> None:
    missing = []
    for table, keys in sorted(loader.fields.items()):
        if table == "":
            missing += [f"[{k}] (a section)" for k in sorted(keys) if k not in DOC]
            continue
        parent, _, sub = table.rpartition(".")
        if sub and parent and table not in DOC:
            # A sub-table is a section of its own, or dotted rows of its parent's table.
            rows = {f"{sub}.{k}" for k in keys}
            missing += [f"{parent}: {r}" for r in sorted(rows - set(DOC.get(parent, {})))]
            continue
        documented = DOC.get(table, {})
        for key in sorted(keys):
            has_rows = any(name.startswith(f"{key}.") for name in documented)
            if key not in documented and not has_rows and f"{table}.{key}" not in DOC:
                missing.append(f"{table}: {key}")
    assert not missing, f"fields the loader reads that docs/config.md lacks: {missing}"


def test_no_row_documents_a_field_the_loader_does_not_read(loader: Loader) -> None:
    extra = []
    for table, rows in DOC.items():
        for name in rows:
            key, _, sub = name.partition(".")
            read = loader.fields.get(f"{table}.{key}" if sub else table, set())
            if (sub or key) not in read:
                extra.append(f"{table}: {name}")
    assert not extra, f"docs/config.md rows the loader does not know: {extra}"


def test_every_choice_is_listed_with_its_default_and_nothing_else(loader: Loader) -> None:
    wrong = []
    for (table, key), (choices, default) in sorted(loader.choices.items()):
        row = DOC.get(table, {}).get(key, "")
        cells = [c.strip() for c in row.strip("|").split("|")]
        quoted = set(re.findall(r'`"([^"`]+)"`', row))
        for value in choices:
            if f'`"{value}"`' not in row:
                wrong.append(f"{table}.{key}: {value!r} not listed")
        if unknown := quoted - set(choices):
            wrong.append(f"{table}.{key}: lists {sorted(unknown)}, which the loader rejects")
        if len(cells) < 2 or cells[1] != f'`"{default}"`':
            wrong.append(f"{table}.{key}: default is {default!r}, docs say {cells[1:2]}")
    assert not wrong, wrong


def test_provider_continuation_lists_every_method_the_loader_accepts() -> None:
    row = DOC["providers"]["continuation"]
    for value in ("turns", "prefill", *(f"prefill:{f}" for f in PREFILL_FLAVOURS)):
        assert f'`"{value}"`' in row, value


def test_docs_name_similarity_measures_as_a_config_spells_them() -> None:
    accepted = set(cfg.SIMILARITIES)
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for value in re.findall(r'cut_similarity\s*=\s*"([^"]*)"', text):
            assert value in accepted, f"{page.name}: cut_similarity = {value!r}"
    policies = (DOCS / "policies.md").read_text(encoding="utf-8")
    for value in accepted:
        assert f'cut_similarity = "{value}"' in policies, value
