"""The Python examples of the README and docs/api.md run, and each ``print``
prints what its comment says.

Convention checked here: in a ```python block of those pages, every line that
calls ``print(...)`` ends with a comment giving the line it prints (``...``
stands for any text), so a comment cannot go stale when the code above it
changes.
"""

import contextlib
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_CHARS = 12_000
# Pages whose examples are complete programs (the other docs show fragments).
RUNNABLE_PAGES = [README, ROOT / "docs" / "api.md"]


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def expected_prints(code: str) -> list[str]:
    """The trailing comment of every line whose statement starts with ``print(``."""
    expected = []
    tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    for i, tok in enumerate(tokens):
        starts_line = i == 0 or tokens[i - 1].type in (tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT,
                                                        tokenize.INDENT, tokenize.DEDENT)
        if tok.type == tokenize.NAME and tok.string == "print" and starts_line:
            line = tok.start[0]
            comment = next((t.string for t in tokens[i:] if t.start[0] == line and t.type == tokenize.COMMENT), None)
            if comment is None:
                raise AssertionError(f"`{tok.line.strip()}` has no '# expected output' comment")
            expected.append(comment[1:].strip())
    return expected


def matches(pattern: str, line: str) -> bool:
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("...")), line) is not None


BLOCKS = [(page, i, code) for page in RUNNABLE_PAGES
          for i, code in enumerate(python_blocks(page.read_text(encoding="utf-8")))]


def test_readme_is_a_front_door():
    assert len(README.read_text(encoding="utf-8")) <= README_MAX_CHARS
    assert any(page == README for page, _, _ in BLOCKS), "the README has no ```python blocks"


@pytest.mark.parametrize("page, index, code", BLOCKS, ids=[f"{p.name}-block{i}" for p, i, _ in BLOCKS])
def test_python_block_runs_and_prints_its_comments(page, index, code, one_thread):
    expected = expected_prints(code)
    torch.manual_seed(0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"{page.name} block {index}", "exec"), {"__name__": "__docs_example__"})
    printed = out.getvalue().splitlines()
    assert len(printed) == len(expected), (printed, expected)
    for pattern, line in zip(expected, printed):
        assert matches(pattern, line), f"{page.name}: the comment says {pattern!r}, the code prints {line!r}"


def test_expected_prints_reads_the_comments_and_catches_a_stale_one():
    code = 'x = 2\nprint(x + 1)  # 3\nprint("a", x)  # a ...\n'
    assert expected_prints(code) == ["3", "a ..."]
    assert matches("a ...", "a 2") and not matches("3", "4")
    with pytest.raises(AssertionError, match="no '# expected output' comment"):
        expected_prints("print(1)\n")
