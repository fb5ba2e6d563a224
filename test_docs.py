"""The documentation's own checks (no model, fast): README.md stays short and starts with the two commands
CI runs, and README.md and docs/*.md link nothing outside the repository and nothing that is missing."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
INSTALL = "pip install torch==2.13.0 && pip install -r requirements.txt"
GENERATE = INSTALL + " && python generate.py --chat --budget 64 --window 16 --prompt-file prompts/passkey.txt"


def ci_command():
    """The command .ci/run runs: its last line that is not a comment, `set` or `cd`."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "set ", "cd "))][-1]


def without_code(text):
    """The text without fenced code blocks and inline code spans, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def links(text):
    """Targets of markdown links and images, [text](target) and ![alt](target)."""
    pattern = r"\]\(\s*(?:<([^>]*)>|([^)\s]+))[^)]*\)"  # an <angle-bracketed> target, or one word; then a title
    return [m.group(1) or m.group(2) for m in re.finditer(pattern, without_code(text))]


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 300


def test_readme_starts_with_the_two_commands():
    first = README.read_text().splitlines()[:8]
    assert ci_command() == INSTALL + " && python -m pytest -q"
    assert GENERATE in first
    assert ci_command() in first
    assert first.index(GENERATE) < first.index(ci_command())


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_address_outside_the_repository(path):
    text = path.read_text()
    for marker in ("http://", "https://", "www."):
        assert marker not in text, f"{path.name} holds {marker!r}"
    for target in links(text):
        assert not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target), f"{path.name} links {target!r}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    for target in links(path.read_text()):
        file = target.split("#", 1)[0]
        if not file:  # an anchor in the same page
            continue
        resolved = (path.parent / file).resolve()
        assert resolved.exists(), f"{path.relative_to(ROOT)} links {target!r}: no {resolved}"
        assert resolved.is_relative_to(ROOT), f"{path.relative_to(ROOT)} links {target!r}, outside the repository"


def test_links_are_found():
    """The link parser itself: links and images, not brackets in code."""
    text = 'a [b](x.md#y) ![c](d/e.png "title") `[f](g)`\n```\n[h](i)\n```\n[j](<k l.md>)'
    assert links(text) == ["x.md#y", "d/e.png", "k l.md"]
