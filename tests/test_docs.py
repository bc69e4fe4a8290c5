"""The repository stands alone: every citation points inside it or to a public URL.

A reader of a comment, a price sheet's `source:` (shown by GET /v1/backends) or a
page under docs/ must be able to follow what it cites. So no text may cite a
document the repository does not hold, every `*.md` path a file mentions must
exist (and its `#anchor`, if any, must be a heading there), and every relative
link in docs/ and the READMEs must resolve to a file in the repository.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
SCANNED_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".toml"}
SKIPPED_DIRS = {".git", "__pycache__", "node_modules", "site-packages", "build", "dist", ".venv", "venv", ".tox", ".nox", ".mypy_cache", ".ruff_cache", ".pytest_cache"}

# Citations of documents that are not part of the repository. The names are
# spelled in pieces so that this file does not itself contain what it forbids.
SHARED, SEEDS, GUIDE, SEED_ID = "shar" + "ed/", "see" + "ds/", "ARCHI" + "TECTURE", "SEE" + "D"
OUTSIDE_CITATIONS: dict[str, re.Pattern[str]] = {
    SHARED: re.compile(r"\b" + SHARED),
    SEEDS: re.compile(r"\b" + SEEDS),
    GUIDE: re.compile(GUIDE),
    SEED_ID + "n": re.compile(r"\b" + SEED_ID + r"\d"),
}

# A path to a markdown file as prose or code mentions it (not part of a URL).
MD_MENTION = re.compile(r"(?<![\w/.:#%~-])((?:\.\.?/)*(?:[\w.-]+/)*[\w-]+\.md)(?:#([\w-]+))?(?![\w/])")
MD_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def scanned_files() -> Iterator[Path]:
    """The repository's text files that can carry a citation (not caches or virtual environments)."""
    for directory, subdirs, files in os.walk(ROOT):
        here = Path(directory)
        subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info") and not (here / d / "pyvenv.cfg").exists())
        for name in sorted(files):
            path = here / name
            if path.suffix in SCANNED_SUFFIXES and path.resolve() != THIS:
                yield path


def outside_citations(text: str) -> list[str]:
    """The names of the outside-citation patterns `text` matches."""
    return [name for name, pattern in OUTSIDE_CITATIONS.items() if pattern.search(text)]


def slug(heading: str) -> str:
    """The anchor a markdown renderer (GitHub's rule) gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        match = None if in_fence else HEADING.match(line)
        if match:
            base = slug(match.group(1))
            name, n = base, 1
            while name in found:  # repeated headings get -1, -2, ...
                name, n = f"{base}-{n}", n + 1
            found.add(name)
    return found


def resolve(target: str, source: Path, *, relative_only: bool) -> Path | None:
    """The repository file `target` names, relative to `source` (or, for prose, to the root)."""
    bases = [source.parent] if relative_only else [source.parent, ROOT]
    for base in bases:
        candidate = (base / target).resolve()
        if candidate.is_relative_to(ROOT) and candidate.exists():
            return candidate
    return None


def broken_target(target: str, anchor: str | None, source: Path, *, relative_only: bool) -> str | None:
    """Why `target#anchor` does not resolve, or None if it does."""
    path = resolve(target, source, relative_only=relative_only) if target else source
    if path is None:
        return f"{target}: no such file in the repository"
    if anchor and path.suffix == ".md" and path.is_file() and anchor not in anchors(path):
        return f"{target or path.name}#{anchor}: no such heading in {path.relative_to(ROOT)}"
    return None


def md_mentions(text: str, *, markdown: bool = False) -> Iterator[tuple[str, str | None]]:
    """`*.md` paths named in `text`; in markdown, a link counts by its target, not its label."""
    if markdown:
        text = MD_LINK.sub(lambda m: f" {m.group(1)} ", text)
    for match in MD_MENTION.finditer(text):
        yield match.group(1), match.group(2)


def relative_links(text: str) -> Iterator[tuple[str, str | None]]:
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for match in MD_LINK.finditer(line):
            href = match.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", href, re.IGNORECASE):  # https:, mailto:, ...
                continue
            target, _, anchor = href.partition("#")
            yield target, anchor or None


# ---- the checks themselves can fail ------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"Protocol ({SHARED}reference/providers.md section 3): create a run", [SHARED]),
        (f"  {SHARED}{SEEDS}003 (docs.empiriolabs.ai/models/flux-2-klein-4b)", [SHARED, SEEDS]),
        (f"say $0.005/MP, {SEEDS}000 (legacy llms.txt)", [SEEDS]),
        (f"What one failure does ({GUIDE} section 4).", [GUIDE]),
        (f"The docs name the full provider/slug form ({SEED_ID}2)", [SEED_ID + "n"]),
        ("Protocol: docs/providers/runflow.md#status-flow.", []),
        ("https://docs.runflow.io/models/black-forest-labs/flux-2-klein-4b", []),
        ("a shared state store; one seed per image", []),
    ],
)
def test_outside_citation_patterns_catch_what_they_must(text: str, expected: list[str]) -> None:
    assert outside_citations(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(providers.md section 1.6)", [("providers.md", None)]),
        ("see docs/providers/fal.md#errors-and-their-classes.", [("docs/providers/fal.md", "errors-and-their-classes")]),
        ("`local_backend/README.md`", [("local_backend/README.md", None)]),
        ("https://docs.runflow.io/concepts/pricing.md", []),
        ("https://fal.ai/docs/api-reference/client-libraries/javascript/queue.md", []),
        ("[local-backend.md](../local-backend.md#batching)", [("../local-backend.md", "batching")]),
    ],
)
def test_markdown_mentions_are_found_but_urls_are_not(text: str, expected: list[tuple[str, str | None]]) -> None:
    assert list(md_mentions(text, markdown=True)) == expected


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Errors and their classes", "errors-and-their-classes"),
        ("Health: breakers, parking and probes", "health-breakers-parking-and-probes"),
        ("per_megapixel", "per_megapixel"),
        ("The local backend: serving FLUX.2 [klein] 4B with diffusers", "the-local-backend-serving-flux2-klein-4b-with-diffusers"),
    ],
)
def test_slug_follows_the_renderers_rule(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_a_missing_file_and_a_missing_heading_are_reported() -> None:
    readme = ROOT / "docs" / "README.md"
    assert broken_target("providers.md", None, ROOT / "gateway" / "providers" / "fal.py", relative_only=False)
    assert broken_target("design.md", "no-such-heading", readme, relative_only=True)
    assert broken_target("design.md", "failure-classes", readme, relative_only=True) is None


# ---- the repository ------------------------------------------------------------


def price_sheets() -> list[Path]:
    """Every YAML file in the repository that is a price sheet (has a basis and a source)."""
    sheets = []
    for path in scanned_files():
        if path.suffix not in (".yaml", ".yml"):
            continue
        try:  # manifests may hold several documents, templates may not parse at all
            documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except yaml.YAMLError:
            continue
        if len(documents) == 1 and isinstance(documents[0], dict) and {"basis", "source"} <= documents[0].keys():
            sheets.append(path)
    return sheets


def test_the_scan_covers_code_sheets_and_docs() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in scanned_files()}
    for expected in ("gateway/providers/fal.py", "README.md", "docs/design.md"):
        assert expected in names
    assert any(name.endswith("providers.yaml") for name in names)
    assert {p.stem for p in price_sheets()} >= {"fal", "replicate", "runflow", "empiriolabs", "local"}


@pytest.mark.parametrize("pattern", sorted(OUTSIDE_CITATIONS))
def test_nothing_cites_a_document_outside_the_repository(pattern: str) -> None:
    regex = OUTSIDE_CITATIONS[pattern]
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in scanned_files()
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if regex.search(line)
    ]
    assert not offenders, f"{len(offenders)} citation(s) of {pattern!r}, which is not in the repository:\n" + "\n".join(offenders)


def test_every_markdown_path_mentioned_exists() -> None:
    offenders = []
    for path in scanned_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for target, anchor in md_mentions(line, markdown=path.suffix == ".md"):
                why = broken_target(target, anchor, path, relative_only=False)
                if why:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {why}")
    assert not offenders, "markdown paths that do not resolve:\n" + "\n".join(offenders)


def documentation_pages() -> list[Path]:
    pages = sorted((ROOT / "docs").rglob("*.md")) if (ROOT / "docs").is_dir() else []
    return pages + [p for p in scanned_files() if p.name == "README.md" and p not in pages]


def test_docs_hold_a_page_for_every_provider_and_the_design() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in documentation_pages()}
    for kind in ("fal", "replicate", "runflow", "empiriolabs", "local"):
        assert f"docs/providers/{kind}.md" in names
    assert {"docs/README.md", "docs/design.md"} <= names


@pytest.mark.parametrize("page", documentation_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    broken = [why for target, anchor in relative_links(text) if (why := broken_target(target, anchor, page, relative_only=True))]
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("sheet", price_sheets(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_price_sheet_names_a_public_source(sheet: Path) -> None:
    source = yaml.safe_load(sheet.read_text(encoding="utf-8"))["source"]
    assert re.search(r"https://[\w.-]+\.\w+/", source), f"{sheet.relative_to(ROOT)}: source names no public URL: {source!r}"
