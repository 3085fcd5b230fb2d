"""``gam bench report DIR...``: several results folders in one markdown report.

Each folder written by a ``gam bench`` command holds ``NAME.md`` (the table and
its setup) and ``NAME.json`` (raw results with an ``environment``). The report
gives a summary line per folder (benchmark, device, threads, load, torch, git
revision, wall time), then each folder's markdown with its headings moved one
level down and its plots linked relative to the report.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from gam.bench.common import describe_environment


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_folder(folder: str | Path) -> list[dict[str, Any]]:
    """The results in ``folder``: one entry per ``NAME.md`` (with ``NAME.json`` when present)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such results folder")
    entries = []
    for md in sorted(folder.glob("*.md")):
        raw = _load_json(md.with_suffix(".json")) or {}
        entries.append({"folder": folder, "name": md.stem, "markdown": md.read_text(), "raw": raw,
                        "plots": sorted(p.name for p in folder.glob("*.png"))})
    if not entries:
        raise FileNotFoundError(f"{folder}: no results (*.md) in this folder")
    return entries


def _demote(markdown: str) -> str:
    return re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", markdown, flags=re.M)


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def render(folders: Sequence[str | Path], out: str | Path | None = None, title: str = "Benchmark report") -> str:
    base = Path(out).parent if out is not None else Path.cwd()
    entries = [e for f in folders for e in read_folder(f)]
    lines = [f"# {title}", "", "| results | benchmark | machine | wall time |", "|---|---|---|---:|"]
    for e in entries:
        raw = e["raw"]
        env = raw.get("environment")
        machine = describe_environment(env) if isinstance(env, dict) else (raw.get("device_name") or "—")
        wall = raw.get("wall_s")
        lines.append(f"| `{_rel(e['folder'] / (e['name'] + '.md'), base)}` | {raw.get('bench') or raw.get('benchmark') or e['name']} "
                     f"| {machine} | {'—' if wall is None else f'{wall / 60:.1f} min'} |")
    lines.append("")
    for e in entries:
        lines += [f"<!-- from {_rel(e['folder'], base)} -->", _demote(e["markdown"]).rstrip(), ""]
        for png in e["plots"]:
            lines.append(f"![{png}]({_rel(e['folder'] / png, base)})")
        if e["plots"]:
            lines.append("")
    text = "\n".join(lines).rstrip() + "\n"
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text
