"""The front page and the guide: the README fits a screen or two, its links lead somewhere, and every measured
figure the README or a guide page quotes is the one docs/BENCHMARKS.md records (one source per figure). The guide's
strict build (broken links and missing pages fail) is its own CI step: mkdocs build --strict -f docs/mkdocs.yml."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide"
BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a measured figure: a number with the unit it was measured in (a share, a ratio, a rate, a size, a time)
FIGURE = re.compile(
    r"(?<![\w.,])(\d[\d,]*(?:\.\d+)?)( ?%|[x×](?![\w])| samples/s| tokens/s| GiB| GB| MiB| min \d+ s| s(?![\w]))"
)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(GUIDE.glob("*.md"))]


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and mkdocs' toc make it (lower case, punctuation dropped, spaces to -)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text()
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def figures(text: str) -> set[str]:
    """The measured figures in ``text``, a ratio's x and × alike."""
    return {"".join(m).replace("×", "x") for m in FIGURE.findall(text)}


def number(figure: str) -> str:
    return re.match(r"\d[\d,]*(?:\.\d+)?", figure).group()


def prose(path: Path) -> str:
    """A page's own text: code blocks (commands, configs) and the lines that include other files left out."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return "\n".join(line for line in text.splitlines() if "--8<--" not in line)


def test_the_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file_and_its_heading(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page.name}: {target} leads nowhere"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page.name}: {target}: no heading {anchor!r} in {path.name}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_every_figure_quoted_is_the_one_benchmarks_records(page):
    recorded = BENCHMARKS.read_text().replace("×", "x")
    numbers = set(re.findall(r"\d[\d,]*(?:\.\d+)?", recorded))  # a table's cells carry their unit in its header
    missing = sorted(
        f for f in figures(prose(page)) if f not in recorded and (f[-1] in "%x" or number(f) not in numbers)
    )
    assert not missing, f"{page.name} quotes figures docs/BENCHMARKS.md does not record: {missing}"


def test_the_figure_check_catches_a_figure_that_drifted(tmp_path):
    """The control: a page quoting the demo's old 98.9% (BENCHMARKS records 98.8% and 95.0%) is caught."""
    page = tmp_path / "page.md"
    page.write_text("The demo reaches 98.9% exact match, and 95.0% in its latest run.\n")
    quoted = figures(prose(page))
    assert quoted == {"98.9%", "95.0%"}
    assert [f for f in quoted if f not in BENCHMARKS.read_text()] == ["98.9%"]
