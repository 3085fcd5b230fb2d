"""The committed results: every JSON a benchmark wrote carries its provenance,
results/README.md indexes every folder, and a replaced run sits under its
folder's superseded/ with a SUPERSEDED.md."""

import datetime as dt
import json
import re
from pathlib import Path

import pytest

from test_docs import broken_links, relative_links

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
INDEX = RESULTS / "README.md"
UNKNOWN = "unknown"
# The block the benches write (src/gam/bench) and the rewritten old files carry.
PROVENANCE_FIELDS = {"git_commit", "git_dirty", "argv", "start_utc", "end_utc", "load_average_start",
                     "load_average_end", "torch", "torch_threads"}
OPTIONAL_FIELDS = {"recovered_from"}  # only in files written before the benches recorded provenance

JSONS = sorted(RESULTS.rglob("*.json"))


def _time(value):
    if value == UNKNOWN:
        return None
    assert isinstance(value, str), value
    t = dt.datetime.fromisoformat(value)
    assert t.utcoffset() == dt.timedelta(0), f"{value}: not UTC"
    return t


def _load_average(value):
    if value != UNKNOWN:
        assert isinstance(value, list) and len(value) == 3, value
        assert all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in value), value


def test_there_are_results():
    assert len(JSONS) >= 20


@pytest.mark.parametrize("path", JSONS, ids=[p.relative_to(RESULTS).as_posix() for p in JSONS])
def test_json_has_provenance(path):
    prov = json.loads(path.read_text(encoding="utf-8")).get("provenance")
    assert isinstance(prov, dict), "no provenance block"
    assert PROVENANCE_FIELDS <= set(prov) <= PROVENANCE_FIELDS | OPTIONAL_FIELDS, sorted(prov)

    commit = prov["git_commit"]
    assert commit == UNKNOWN or re.fullmatch(r"[0-9a-f]{40}", commit), commit
    assert prov["git_dirty"] == UNKNOWN or isinstance(prov["git_dirty"], bool)
    argv = prov["argv"]
    assert argv == UNKNOWN or (isinstance(argv, list) and argv and all(isinstance(a, str) and a for a in argv))
    start, end = _time(prov["start_utc"]), _time(prov["end_utc"])
    if start and end:
        assert start <= end
    _load_average(prov["load_average_start"])
    _load_average(prov["load_average_end"])
    assert prov["torch"] == UNKNOWN or (isinstance(prov["torch"], str) and re.match(r"\d+\.\d+", prov["torch"]))
    threads = prov["torch_threads"]
    assert threads == UNKNOWN or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1)
    if "recovered_from" in prov:
        assert isinstance(prov["recovered_from"], str) and prov["recovered_from"].strip()


def indexed_dirs() -> list[str]:
    """Every folder under results/, down to superseded/NAME/ but not inside a superseded run."""
    found = []
    for d in sorted(p for p in RESULTS.rglob("*") if p.is_dir()):
        parts = d.relative_to(RESULTS).parts
        if "superseded" in parts and len(parts) > parts.index("superseded") + 2:
            continue
        found.append("/".join(parts) + "/")
    return found


def index_targets() -> set[str]:
    return {target.partition("#")[0] for _, target in relative_links(INDEX)}


def test_index_links_every_folder():
    targets = index_targets()
    assert [d for d in indexed_dirs() if not d.endswith("/superseded/") and d not in targets] == []


def test_index_links_every_top_level_file():
    files = [p.name for p in RESULTS.iterdir() if p.is_file() and p != INDEX]
    assert [f for f in files if f not in index_targets()] == []


def test_index_links_resolve():
    assert broken_links(INDEX) == []


def test_runs_sit_at_the_top_or_under_superseded():
    """A results folder's only subfolder is superseded/, and that holds only run folders."""
    for folder in (p for p in RESULTS.iterdir() if p.is_dir()):
        assert [p.name for p in folder.iterdir() if p.is_dir() and p.name != "superseded"] == [], folder.name
        superseded = folder / "superseded"
        if superseded.exists():
            assert [p.name for p in superseded.iterdir() if not p.is_dir()] == [], superseded
            assert any(superseded.iterdir()), f"{superseded} is empty"


@pytest.mark.parametrize("run", sorted(p for p in RESULTS.glob("*/superseded/*") if p.is_dir()),
                         ids=lambda p: p.relative_to(RESULTS).as_posix())
def test_superseded_run_says_why(run):
    note = run / "SUPERSEDED.md"
    assert note.is_file() and note.read_text(encoding="utf-8").strip(), f"{run} has no SUPERSEDED.md"
