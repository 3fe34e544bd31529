"""The documentation is checked like code: the README's length, every relative link (and the heading an
anchor names), and every command block of the README and docs/, which either runs here in a temporary
directory or carries a marker on its first line saying why not:

    # cluster ...                     needs a SLURM cluster, GPUs or data that only a cluster has
    # long (N min ...)                 runs too long for this test (the duration is required)
    # tested by tests/PATH.py::NAME    the same commands are exercised by that test (which must exist)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import ROOT, child_env

README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
COMMAND_LANGS = {"bash", "sh", "console"}

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")  # indented fences (inside list items) count too
_LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")
_LONG = re.compile(r"^# long \(\d+(?:[-–]\d+)? (?:s|min|h)\b")
_TESTED_BY = re.compile(r"^# tested by (tests/\S+\.py)::(\w+)$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    lines: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def marker(self) -> str | None:
        first = self.lines[0].strip() if self.lines else ""
        return first if first.startswith(("# cluster", "# long", "# tested by")) else None

    def commands(self) -> str:
        if self.lang == "console":  # only the `$ ` lines are commands; the rest is their output
            return "\n".join(line[2:] for line in self.lines if line.startswith("$ "))
        return "\n".join(self.lines)


def split_markdown(text: str, path: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """(fenced code blocks, the text lines outside them with their line numbers)."""
    blocks, prose = [], []
    fence, lang, start, body, indent = None, "", 0, [], 0
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence, lang, start, body = match.group(1), match.group(2).lower(), number, []
            indent = len(line) - len(line.lstrip())
        elif fence is not None and line.strip().startswith(fence) and not line.strip()[len(fence):].strip():
            blocks.append(Block(path, start, lang, tuple(body)))
            fence = None
        elif fence is not None:
            body.append(line[indent:] if line[:indent].isspace() else line)
        else:
            prose.append((number, line))
    return blocks, prose


def heading_anchors(text: str, path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces to '-',
    repeats numbered)."""
    anchors, seen = set(), {}
    for _, line in split_markdown(text, path)[1]:
        if not re.match(r"^#{1,6} ", line):
            continue
        title = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        count = seen.get(title, 0)
        seen[title] = count + 1
        anchors.add(title if count == 0 else f"{title}-{count}")
    return anchors


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of `path` whose file does not exist under `root`, or whose #anchor names no
    heading of that file."""
    text = path.read_text()
    errors = []
    for number, line in split_markdown(text, path)[1]:
        for target in _LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(root)}:{number}: {target}"
            if not resolved.is_relative_to(root.resolve()):
                errors.append(f"{where}: outside the repository")
                continue
            if not resolved.exists():
                errors.append(f"{where}: no such file")
                continue
            if anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved.read_text(), resolved):
                errors.append(f"{where}: no heading with anchor #{anchor}")
    return errors


def all_blocks() -> list[Block]:
    return [b for path in DOC_FILES for b in split_markdown(path.read_text(), path)[0] if b.lang in COMMAND_LANGS]


def test_readme_is_at_most_250_lines():
    assert len(README.read_text().splitlines()) <= 250


def test_every_relative_link_resolves():
    errors = [e for path in DOC_FILES for e in broken_links(path)]
    assert not errors, "\n".join(errors)


def test_the_link_check_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Title\n\n## A section\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](docs/b.md#a-section) [ok](#top) [web](https://example.org/x)\n\n# Top\n\n"
                    "[gone](docs/c.md) [bad anchor](docs/b.md#no-such) `[in code](nowhere.md)`\n"
                    "```bash\n[in a block](nowhere.md)\n```\n")
    errors = broken_links(page, root=tmp_path)
    assert len(errors) == 2, errors
    assert "docs/c.md: no such file" in errors[0] and "#no-such" in errors[1]


def test_every_marked_command_block_says_why():
    for block in all_blocks():
        marker = block.marker
        if marker is None or marker.startswith("# cluster"):
            continue
        if marker.startswith("# long"):
            assert _LONG.match(marker), f"{block.name}: '# long' needs its duration, e.g. '# long (12 min)'"
            continue
        match = _TESTED_BY.match(marker)
        assert match, f"{block.name}: expected '# tested by tests/PATH.py::NAME', got {marker!r}"
        test_file = ROOT / match.group(1)
        assert test_file.is_file(), f"{block.name}: {match.group(1)} does not exist"
        assert re.search(rf"^def {match.group(2)}\(", test_file.read_text(), re.M), \
            f"{block.name}: {match.group(1)} has no test {match.group(2)}"


def _shims(bin_dir: Path) -> None:
    """`megatron-sgtm`, `python` and `torchrun` of this interpreter and checkout, as the README's commands call them."""
    bin_dir.mkdir()
    for name, target in (("megatron-sgtm", "-m megatron_sgtm.cli"), ("python", ""),
                         ("torchrun", "-m torch.distributed.run")):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" {target} "$@"\n')
        shim.chmod(0o755)


UNMARKED = [b for b in all_blocks() if b.marker is None]


@pytest.mark.parametrize("block", UNMARKED, ids=[b.name for b in UNMARKED])
def test_unmarked_command_block_runs(block, tmp_path):
    """The block's commands, as written, in an empty directory that sees the checkout's examples/, tools/ and
    slurm/; any failing command fails the test."""
    for name in ("examples", "tools", "slurm"):
        (tmp_path / name).symlink_to(ROOT / name)
    _shims(tmp_path / "bin")
    env = child_env(PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.commands()], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{block.name} failed ({result.returncode}):\n{result.stderr[-3000:]}"
