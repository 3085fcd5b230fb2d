"""Every relative link in README.md and docs/*.md resolves: the file or folder
exists, and a ``#fragment`` into a markdown file names one of its headings
(GitHub's anchor rules)."""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
# [text](target) or [text](target "title"); images too. Targets have no spaces.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str):
    """(line number, line) of the lines outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation
    removed (letters, digits, '-', '_' and spaces kept), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, repeated headings numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path):
    """(line number, target) of every link that is not a URL."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:, ...
                yield number, target


def broken_links(path: Path) -> list[str]:
    problems = []
    for number, target in relative_links(path):
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where} (no such file)")
        elif fragment and dest.suffix == ".md" and unquote(fragment) not in anchors(dest):
            problems.append(f"{where} (no heading with anchor #{fragment} in {dest.name})")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_readme_links_every_docs_page():
    readme = ROOT / "README.md"
    linked = {(readme.parent / target.partition("#")[0]).resolve() for _, target in relative_links(readme)}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_slug_follows_github_rules():
    assert slug("Table 2: one block, forward + backward (CPU)") == "table-2-one-block-forward--backward-cpu"
    assert slug("`gam train` with no arguments") == "gam-train-with-no-arguments"
    assert slug("Table 1 at the paper's scale on the H100") == "table-1-at-the-papers-scale-on-the-h100"
    assert slug("5.1 Shared LM wrapper [BM, GM]") == "51-shared-lm-wrapper-bm-gm"


def test_checker_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Real heading\n\n## Twice\n\n## Twice\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n"
        "[ok](other.md#real-heading) [ok](other.md#twice-1) [ok](#top) [web](https://example.com/x#y)\n"
        "`[not a link](missing.md)`\n"
        "```\n[in code](missing.md)\n# not a heading\n```\n"
        "[gone](missing.md) [bad anchor](other.md#nope) [bad local](#not-a-heading)\n",
        encoding="utf-8",
    )
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert "missing.md (no such file)" in problems[0]
    assert "#nope" in problems[1] and "#not-a-heading" in problems[2]


def test_the_folders_the_docs_write_into_are_ignored_by_git():
    """Following the docs in a clone must not leave untracked files: `gam export RUN hf-gam/`
    and `gam train` (runs/) write where .gitignore covers."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    outputs = {"runs"}
    for page in PAGES:
        for folder in re.findall(r"gam export runs/\S+ ([\w.-]+)", page.read_text(encoding="utf-8")):
            outputs.add(folder)
    assert "hf-gam" in outputs  # the folder the README and docs export into
    not_ignored = [folder for folder in sorted(outputs)
                   if subprocess.run(["git", "check-ignore", "-q", f"{folder}/model.safetensors"],
                                     cwd=ROOT).returncode != 0]
    assert not_ignored == []
