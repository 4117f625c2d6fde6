"""README is a front door: short, and every relative link in it (and in the other top-level pages)
leads somewhere."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 200

# [text](target) and ![alt](target); the target ends at whitespace or ')' (an optional "title" follows)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(text: str) -> list[str]:
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "//")):
            continue  # http(s):, mailto:, in-page anchors
        out.append(target.split("#", 1)[0].split("?", 1)[0])
    return out


def test_readme_is_at_most_200_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines (at most {MAX_LINES}): move the detail into docs/"


@pytest.mark.parametrize("name", ["README.md", "CONTRIBUTING.md", "CHANGELOG.md"])
def test_every_relative_link_exists(name):
    page = ROOT / name
    links = relative_links(page.read_text(encoding="utf-8"))
    if name == "README.md":
        assert links, "README links nothing: where does a reader go next?"
    missing = [t for t in links if not (page.parent / t).exists()]
    assert not missing, f"{name} links to missing files: {missing}"


def test_link_parser():
    text = '[a](docs/a.md) ![p](img/x.png "t") [w](https://x.org/y) [s](#sec) [b](docs/b.md#part)'
    assert relative_links(text) == ["docs/a.md", "img/x.png", "docs/b.md"]
