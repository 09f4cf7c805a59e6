"""The repository's documents: every citation of a Markdown document resolves to a file of
the repository (and every cited section to a heading of it), and the numbers and settings
the docs state are the ones the code uses.

A citation is a ``*.md`` path that names a document: a Markdown link's target, a path
followed by "section N" (or "sections N-M", "sN") or "contract N", a path with a ``docs``
or ``shared`` folder or a leading ``..``, the name of one of the repository's documents
(``docs/*.md``, ``README.md``), or a name of the team's working notes, which live outside
the repository and so never resolve. File names the program writes (a run's
``summary.md``, the tables of ``spl reproduce``, a benchmark's ``--out``) and paths with
placeholders (``$OUT/...``, ``<name>``) are not citations. A citation resolves relative
to the citing file, to the repository root or to ``docs/`` (a link's target relative to
the citing file only, as a renderer reads it); "section N" must be a ``## N.`` heading of
the cited file, "contract N" a numbered item ``N.`` of it (docs/architecture.md's files
between stages).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from spl.data import protocol
from spl.evaluate import paper
from spl.fit.losses import get_loss
from spl.fit.losses.entropy import ALPHA, BETA, WARMUP
from spl.fit.losses.large_loss import DELTA_REL
from spl.fit.losses.vision_language import AEVLP_OPTIONS
from spl.fit.recipes import source_recipe

REPO = Path(__file__).resolve().parents[1]
PROTOCOL_DOC = REPO / "docs/protocol.md"
METHODS_DOC = REPO / "docs/methods.md"
# The team's working notes (outside the repository): a citation of one never resolves.
NOTES = ("paper", "methods", "design", "style")
SCANNED_SUFFIXES = {".py", ".md", ".sh", ".toml"}
SCANNED_NAMES = {"Makefile"}
# Folders of outputs and environments, never the repository's own text.
SKIPPED_FOLDERS = {"__pycache__", "build", "dist", "runs", "tables", "node_modules"}
DATASETS = protocol.PAPER_DATASETS  # the column order of every per-dataset table

# A path ending in .md, not preceded by a path character (so `EM:README.md`, a release's
# file, and the tail of a longer path are not matched on their own).
PATH = re.compile(r"(?<![\w.:/$<>{}*-])((?:[\w.$<>{}*-]*/)*\w[\w.-]*\.md)(?![\w-])")
SECTIONS = re.compile(
    r"[`'\")\]]*\s*,?\s*(?:sections?\s+|§\s*|s(?=\d))(\d+)((?:\s*(?:-|–|,|and|to)\s*\d+)*)"
)
CONTRACTS = re.compile(r"[`'\")\]]*\s*,?\s*contracts?\s+(\d+[a-z]?)((?:\s*(?:,|and)\s*\d+[a-z]?)*)")
HEADING = re.compile(r"^## (\d+)\.", re.MULTILINE)
NUMBERED_ITEM = re.compile(r"^(\d+[a-z]?)\.\s", re.MULTILINE)


@dataclass(frozen=True)
class Citation:
    source: Path
    line: int
    target: str
    link: bool
    sections: tuple[int, ...]
    contracts: tuple[str, ...]


def _numbers(first: str, rest: str) -> tuple[int, ...]:
    """``2`` and ``-5`` give (2, 3, 4, 5); ``8`` and `` and 9`` give (8, 9)."""
    out = [int(first)]
    for sep, value in re.findall(r"\s*(-|–|,|and|to)\s*(\d+)", rest):
        if sep in ("-", "–", "to"):
            out += range(out[-1] + 1, int(value) + 1)
        else:
            out.append(int(value))
    return tuple(out)


def document_names(root: Path) -> set[str]:
    """File names of the repository's documents (a bare mention of one is a citation)."""
    names = {p.name for p in (root / "docs").glob("*.md")}
    return names | {"README.md"}


def citations(text: str, source: Path, documents: set[str]) -> list[Citation]:
    """The citations of documents in ``text`` (module docstring: what counts as one)."""
    out = []
    for match in PATH.finditer(text):
        target = match.group(1)
        if any(c in target for c in "$<>{}*"):
            continue  # a placeholder: a path the program or a script fills in
        link = text[max(0, match.start() - 2) : match.start()] == "]("
        after = text[match.end() : match.end() + 80]
        sections = contracts = ()
        if found := SECTIONS.match(after):
            sections = _numbers(found.group(1), found.group(2))
        elif found := CONTRACTS.match(after):
            contracts = (found.group(1), *re.findall(r"\d+[a-z]?", found.group(2)))
        parts = target.split("/")
        cited = (
            link
            or sections
            or contracts
            or parts[-1][: -len(".md")] in NOTES
            or parts[0] in ("..", ".")
            or any(p in ("docs", "shared") for p in parts[:-1])
            or parts[-1] in documents
        )
        if cited:
            line = text.count("\n", 0, match.start()) + 1
            out.append(Citation(source, line, target, link, sections, contracts))
    return out


def resolve(citation: Citation, root: Path) -> Path | None:
    """The repository file a citation names, or None."""
    target = citation.target
    if target.startswith("/"):
        return None  # an absolute path: outside the repository
    if "/" not in target and target[: -len(".md")] in NOTES:
        return None  # the notes' bare names: not the repository's documents
    bases = (
        [citation.source.parent] if citation.link else [citation.source.parent, root, root / "docs"]
    )
    root = root.resolve()
    for base in bases:
        candidate = (base / target).resolve()
        if candidate.is_file() and candidate.is_relative_to(root):
            return candidate
    return None


def problems(root: Path, exclude: frozenset[Path] = frozenset()) -> list[str]:
    """Every citation under ``root`` (but in the files ``exclude``) that does not resolve,
    or names a missing section or item."""
    documents = document_names(root)
    out = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(
            d for d in subfolders
            if not d.startswith(".") and d not in SKIPPED_FOLDERS and not d.endswith(".egg-info")
        )  # fmt: skip
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix not in SCANNED_SUFFIXES and name not in SCANNED_NAMES:
                continue
            if path.resolve() in exclude:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for citation in citations(text, path, documents):
                where = f"{path.relative_to(root)}:{citation.line}: {citation.target}"
                resolved = resolve(citation, root)
                if resolved is None:
                    out.append(f"{where}: no such file in the repository")
                    continue
                cited = resolved.read_text(encoding="utf-8")
                headings = {int(n) for n in HEADING.findall(cited)}
                missing = [n for n in citation.sections if n not in headings]
                if missing:
                    out.append(f"{where}: no section {missing} (a '## N.' heading)")
                items = set(NUMBERED_ITEM.findall(cited))
                missing_items = [c for c in citation.contracts if c not in items]
                if missing_items:
                    out.append(f"{where}: no numbered item {missing_items}")
    return out


def test_every_citation_of_a_document_resolves_inside_the_repository():
    # This file is left out: its check of the checker cites missing files on purpose.
    found = problems(REPO, frozenset({Path(__file__).resolve()}))
    assert not found, f"{len(found)} citations do not resolve:\n" + "\n".join(found)


def test_the_citation_check_finds_what_it_should(tmp_path):
    note = "paper" + ".md"  # the notes' names, spelled so that no search-and-replace finds them
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "protocol.md").write_text("# P\n\n## 1. One\n\n## 2. Two\n")
    (tmp_path / "docs" / "arch.md").write_text("# A\n\n1. labels\n2b. scores\n")
    (tmp_path / "docs" / "guide.md").write_text(
        "[ok](./protocol.md) [broken](docs/protocol.md) see protocol.md section 2\n"
    )
    (tmp_path / "README.md").write_text("[guide](docs/guide.md), `../outside/x.md`\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        f'"""From {note} section 2 and docs/protocol.md sections 1-2 (docs/protocol.md s3).\n'
        "The file (docs/arch.md, contract 2b); the run (docs/arch.md contracts 1 and 4).\n"
        "EM:README.md, summary.md, $OUT/fit_linear.md, tables / 'linear.md', /tmp/x.md,\n"
        '/abs/docs/y.md, docs/protocol.md section 2."""\n'
    )
    got = sorted(problems(tmp_path))
    assert got == sorted(
        [
            "README.md:1: ../outside/x.md: no such file in the repository",
            "docs/guide.md:1: docs/protocol.md: no such file in the repository",
            f"pkg/mod.py:1: {note}: no such file in the repository",
            "pkg/mod.py:1: docs/protocol.md: no section [3] (a '## N.' heading)",
            "pkg/mod.py:2: docs/arch.md: no numbered item ['4']",
            "pkg/mod.py:4: /abs/docs/y.md: no such file in the repository",
        ]
    )


# ---------------------------------------------------------------- the docs' own content


def section(path: Path, number: int) -> str:
    """The text of section ``## number.`` of a document, up to the next ``## `` heading."""
    text = path.read_text(encoding="utf-8")
    match = re.search(rf"^## {number}\. .*?(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    if match is None:
        pytest.fail(f"{path.name} has no section {number} (a '## {number}.' heading)")
    return match.group(0)


def tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables of ``text``: rows of stripped cells, the header row first and
    the separator row left out."""
    out, current = [], None
    for line in text.splitlines():
        if line.lstrip().startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(re.fullmatch(r":?-+:?", c) for c in cells):
                continue
            if current is None:
                current = []
                out.append(current)
            current.append(cells)
        else:
            current = None
    return out


def value(cell: str):
    """A table cell as a number, a tuple of numbers (``[0, 2, −2, −2]``, ``(0.7, 0.4)``,
    ``0.2 / 0.2 / 0.1``) or None (``–``)."""
    cell = cell.replace("−", "-").strip("` ")
    if cell in ("–", "-"):
        return None
    parts = re.split(r"\s*[,/]\s*", cell.strip("[]()"))
    numbers = [float(p) for p in parts]
    return numbers[0] if len(numbers) == 1 else tuple(numbers)


def key(cell: str) -> str:
    return cell.strip("` ")


def test_the_docs_have_the_notes_section_numbers():
    for path, numbers in ((PROTOCOL_DOC, range(1, 9)), (METHODS_DOC, range(13))):
        headings = [int(n) for n in HEADING.findall(path.read_text(encoding="utf-8"))]
        assert headings == list(numbers), path.name


def test_protocol_numbers_are_the_codes():
    # section 2: k per dataset
    (datasets,) = tables(section(PROTOCOL_DOC, 2))
    k = {re.search(r"`(\w+)`", row[0]).group(1): value(row[2]) for row in datasets[1:]}
    assert k == protocol.EXPECTED_POSITIVES
    # section 5: LinearInit's fixed linear phase
    linearinit = tables(section(PROTOCOL_DOC, 5))[0]
    names = {"AN-LS": "an_ls", "ROLE": "role", "NUS-WIDE": "nuswide", "CUB": "cub"}
    got = {}
    for loss, lr, batch, exception in linearinit[1:]:
        dataset, exception_batch = re.fullmatch(r"(\S+): batch (\d+)", exception).groups()
        got[names[loss]] = {"lr": value(lr), "batch_size": int(batch),
                            "batch_size_for": {names[dataset]: int(exception_batch)}}  # fmt: skip
    assert got == protocol.LINEARINIT
    # section 7: the paper's tables
    test_map, recovery = tables(section(PROTOCOL_DOC, 7))
    linear = {key(r[1]): dict(zip(DATASETS, map(value, r[3:7]), strict=True)) for r in test_map[1:]}
    finetune = {
        key(r[1]): dict(zip(DATASETS, map(value, r[7:11]), strict=True)) for r in test_map[1:]
    }
    assert {k: v for k, v in linear.items() if "+" not in k} == paper.LINEAR
    assert all(v is None for k, row in linear.items() if "+" in k for v in row.values())
    assert finetune == paper.FINETUNE
    assert {
        key(r[1]): dict(zip(DATASETS, map(value, r[2:6]), strict=True)) for r in recovery[1:]
    } == (paper.RECOVERY)
    # section 8: the methods since, as `spl reproduce --table since-2021` shows them
    (since,) = tables(section(PROTOCOL_DOC, 8))
    published = {key(r[1]): dict(zip(DATASETS, map(value, r[3:7]), strict=True)) for r in since[1:]}
    assert published == paper.SINCE_2021


def _rows(table: list[list[str]]) -> dict[str, list]:
    return {row[0]: [value(c) if c != "same" else None for c in row[1:]] for row in table[1:]}


def test_methods_settings_are_the_codes():
    # section 2: EM + APL per dataset
    apl = next(t for t in tables(section(METHODS_DOC, 2)) if any(r[0] == "β" for r in t))
    rows = _rows(apl)
    assert dict(zip(DATASETS, rows["α"], strict=True)) == ALPHA
    assert dict(zip(DATASETS, rows["β"], strict=True)) == BETA
    assert dict(zip(DATASETS, rows["warm-up epoch W"], strict=True)) == WARMUP
    # section 3: LargeLoss's delta_rel and optimiser per dataset
    settings = next(
        t for t in tables(section(METHODS_DOC, 3)) if any(r[0] == "optimiser, lr" for r in t)
    )
    by_row = {row[0]: row[1:] for row in settings[1:]}
    for i, dataset in enumerate(DATASETS):
        deltas = value(by_row["Δ in % for LL-R / LL-Ct / LL-Cp"][i])
        assert deltas == tuple(DELTA_REL[k][dataset] for k in ("ll_r", "ll_ct", "ll_cp"))
        optimiser, lr = by_row["optimiser, lr"][i].split(", ")
        recipe = source_recipe("ll_r", dataset)
        assert (recipe.optimizer, recipe.lr) == (optimiser.lower(), value(lr))
    # section 9: AEVLP's configs
    aevlp = tables(section(METHODS_DOC, 9))[-1]
    rows = _rows(aevlp)
    options = {
        "k schedule [w0, wT, b0, bT]": "k_schedule", "[q2, q3]": "q", "(λ1, λ2)": "lam",
        "reg (regulariser weight)": "reg", "k̂ (expected positives)": "expected_positives",
        "CLIP temperature T": "temperature", "eta": "eta", "threshold": "threshold",
        "grid g": "grid", "top_k": "top_k", "negative_ratio (only erases)": "negative_ratio",
    }  # fmt: skip
    defaults = get_loss("gpr").Options()
    for i, dataset in enumerate(DATASETS):
        for row, option in options.items():
            assert rows[row][i] == AEVLP_OPTIONS[dataset][option], (row, dataset)
        recipe = source_recipe("gpr", dataset)
        assert (recipe.epochs, recipe.batch_size) == (rows["epochs"][i], rows["batch"][i])
        assert (recipe.lr, recipe.head_lr_multiplier) == (rows["lr (Adam, head × 10)"][i], 10)
        assert rows["ρ"][i] == defaults.rho
    assert rows["v schedule [μ0, σ0, μT, σT]"][0] == defaults.v_schedule
