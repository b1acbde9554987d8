"""The documentation's links and citations.

* Every relative Markdown link and image in README.md, docs/**/*.md and the examples'
  docstrings points at a file in the repository, and an anchor (``#...``) at a heading of the
  target (GitHub's heading ids). Repository paths written out in the text (``tests/...py``,
  ``docs/...md``) exist, and ``tests/<file>.py::<name>`` names a test defined in that file.
* No document cites material outside the repository: a research file, "user needs", a
  "survey", a machine path, or fault labels such as "B14" that only such a file defines.
* docs/peers.md names, for each library it discusses, a test file that exists.
"""

from __future__ import annotations

import ast
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

MARKDOWN = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
REPO_PATH = re.compile(r"(?<![\w./-])((?:docs|tests|examples|benchmarks|src)/[\w./-]*\w\.(?:md|py|png|json))")
TEST_REF = re.compile(r"((?:tests|E)(?:/[\w./-]+\.py)?)::(\w+)")
EXTERNAL = ("http://", "https://", "mailto:")

FORBIDDEN = [
    (re.compile(r"user[- ]needs", re.IGNORECASE), "a user-needs document"),
    (re.compile(r"\bsurvey", re.IGNORECASE), "a survey"),
    (re.compile(r"/work/"), "a machine path"),
    (re.compile(r"shared/reference|reference/peers"), "the research folder"),
    (re.compile(r"\bB\d{1,3}\b"), "a fault label (B<number>) defined outside the repository"),
]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, numbered from 1."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def without_code(line: str) -> str:
    return INLINE_CODE.sub(" ", line)


def slug(heading: str) -> str:
    """GitHub's id for a heading: links reduced to their text, lower case, punctuation other
    than ``-`` and ``_`` dropped, spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    kept = []
    for ch in text:
        if ch in " -_" or unicodedata.category(ch)[0] in "LN":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def docstrings(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                line = node.body[0].lineno if node.body else 1
                out.append((line, doc))
    return out


def documents() -> list[tuple[Path, list[tuple[int, str]]]]:
    """(file, its prose lines): the Markdown files outside code blocks, the examples' docstrings."""
    out = [(p, prose_lines(p.read_text(encoding="utf-8"))) for p in MARKDOWN]
    for p in EXAMPLES:
        lines = []
        for start, doc in docstrings(p):
            lines += [(start + i, line) for i, line in enumerate(doc.splitlines())]
        out.append((p, lines))
    return out


DOCUMENTS = documents()


def link_targets(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    out = []
    for number, line in lines:
        text = without_code(line)
        out += [(number, m.group(1)) for m in LINK.finditer(text)]
        out += [(number, m.group(1)) for m in REFERENCE.finditer(text)]
    return out


def check_target(source: Path, target: str) -> str | None:
    """None if ``target`` (relative to ``source``) resolves, else what is wrong."""
    path_part, _, anchor = target.partition("#")
    dest = source if not path_part else (source.parent / path_part).resolve()
    if not dest.is_relative_to(ROOT):
        return f"{target}: outside the repository"
    if not dest.exists():
        return f"{target}: no such file"
    if anchor:
        if dest.suffix != ".md":
            return f"{target}: an anchor into a file that is not Markdown"
        if anchor not in anchors(dest):
            return f"{target}: no heading #{anchor} in {rel(dest)}"
    return None


def test_the_documents_are_found() -> None:
    names = {rel(p) for p, _ in DOCUMENTS}
    assert {"README.md", "docs/peers.md", "docs/averaging.md", "docs/migration/torch.md"} <= names
    assert any(n.startswith("examples/") for n in names)


@pytest.mark.parametrize("path", [p for p, _ in DOCUMENTS], ids=lambda p: rel(p))
def test_relative_links_resolve(path: Path) -> None:
    lines = dict(DOCUMENTS)[path]
    problems = []
    for number, target in link_targets(lines):
        if target.startswith(EXTERNAL):
            continue
        problem = check_target(path, target)
        if problem:
            problems.append(f"{rel(path)}:{number}: {problem}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", [p for p, _ in DOCUMENTS], ids=lambda p: rel(p))
def test_repository_paths_and_test_names_exist(path: Path) -> None:
    """Paths such as ``tests/test_x.py`` or ``docs/x.md`` written in the text are read from the
    repository root (and, for Markdown, also from the document's folder); ``file.py::name`` (on
    docs/peers.md ``E::name`` stands for tests/test_peers_evidence.py) must define ``name``."""
    lines = dict(DOCUMENTS)[path]
    problems = []
    for number, line in lines:
        for m in REPO_PATH.finditer(line):
            candidate = m.group(1)
            if not ((ROOT / candidate).exists() or (path.parent / candidate).exists()):
                problems.append(f"{rel(path)}:{number}: {candidate}: no such file")
        for m in TEST_REF.finditer(line):
            file = "tests/test_peers_evidence.py" if m.group(1) == "E" else m.group(1)
            target = ROOT / file
            if not target.is_file():
                problems.append(f"{rel(path)}:{number}: {file}: no such file")
            elif not re.search(
                rf"^\s*(?:async\s+)?def {m.group(2)}\(", target.read_text(encoding="utf-8"), re.MULTILINE
            ):
                problems.append(f"{rel(path)}:{number}: {file} defines no {m.group(2)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", [p for p, _ in DOCUMENTS], ids=lambda p: rel(p))
def test_no_citation_of_material_outside_the_repository(path: Path) -> None:
    lines = dict(DOCUMENTS)[path]
    problems = []
    for number, line in lines:
        for pattern, what in FORBIDDEN:
            if pattern.search(line):
                problems.append(f"{rel(path)}:{number}: cites {what}: {line.strip()}")
        # "peers.md" only as this repository's docs/peers.md
        for m in re.finditer(r"[\w./-]*peers\.md", line):
            name = m.group(0)
            here = (path.parent / name).resolve()
            if here != ROOT / "docs" / "peers.md" and (ROOT / name).resolve() != ROOT / "docs" / "peers.md":
                problems.append(f"{rel(path)}:{number}: {name} is not this repository's docs/peers.md")
    assert not problems, "\n".join(problems)


PEERS = ROOT / "docs" / "peers.md"
LIBRARIES = [
    "torch.optim.swa_utils",
    "mmengine",
    "ema-pytorch",
    "diffusers",
    "torch-ema",
    "Lightning",
    "timm",
    "mmcv 1.x",
    "mmagic",
    "mmpretrain",
    "mmdet",
    "EDM2",
]


def sections(path: Path) -> dict[str, str]:
    """Heading text -> the text up to the next heading of the same or a higher level."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if m:
            level = len(m.group(1))
            stack = [(lv, t) for lv, t in stack if lv < level]
            stack.append((level, m.group(2)))
            out[m.group(2)] = ""
            continue
        for _, title in stack:
            out[title] += line + "\n"
    return out


@pytest.mark.parametrize("library", LIBRARIES)
def test_peers_page_names_an_existing_test_for_each_library(library: str) -> None:
    found = sections(PEERS)
    assert library in found, f"docs/peers.md has no heading {library!r}"
    text = found[library]
    files = set(REPO_PATH.findall(text)) | {"tests/test_peers_evidence.py" for _ in re.findall(r"\bE::\w+", text)}
    existing = {
        f for f in files if f.endswith(".py") and f.startswith(("tests/", "benchmarks/")) and (ROOT / f).is_file()
    }
    assert existing, f"docs/peers.md, {library}: no test or script file named"


def test_every_test_of_the_evidence_file_is_on_the_peers_page() -> None:
    """Each test in tests/test_peers_evidence.py is cited on docs/peers.md, so the page is the
    index of the evidence."""
    source = (ROOT / "tests" / "test_peers_evidence.py").read_text(encoding="utf-8")
    tests = set(re.findall(r"^def (test_\w+)\(", source, re.MULTILINE))
    page = PEERS.read_text(encoding="utf-8")
    cited = {m.group(2) for m in TEST_REF.finditer(page) if m.group(1) in ("E", "tests/test_peers_evidence.py")}
    assert tests - cited == set()


def test_slug_follows_github() -> None:
    assert slug("Compared with the peers") == "compared-with-the-peers"
    assert slug("torch.optim.swa_utils") == "torchoptimswa_utils"
    assert slug("mmcv 1.x") == "mmcv-1x"
    assert slug("Momentum, decay and the counting rule") == "momentum-decay-and-the-counting-rule"
    assert slug("Differences from Lightning's `WeightAveraging` / `EMAWeightAveraging`") == (
        "differences-from-lightnings-weightaveraging--emaweightaveraging"
    )
    assert (
        slug("Host synchronisation on a GPU: read from the code") == "host-synchronisation-on-a-gpu-read-from-the-code"
    )
