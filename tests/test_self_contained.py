"""The repository is self-contained (issue 12, item 6): no tracked file points at a path of one
development machine (home or root folders, the project's scratch tree) or at specification
files outside the repository. The facts the code relies on are in docs/algorithms.md and
docs/theory-reference.md."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# written in pieces so that this file does not match itself
MACHINE = re.compile("|".join([r"/" + "work/", r"/" + "root/", r"/" + "home/",
                               r"shared/" + "reference", r"/" + "Users/"]))
TEXT = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".sh", ".yml", ".yaml", ".json", ""}


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / p for p in out.decode().split("\0") if p]


def test_no_machine_paths_in_tracked_files():
    hits = []
    for path in _tracked():
        if path.suffix not in TEXT or not path.is_file():
            continue
        for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if MACHINE.search(line):
                hits.append(f"{path.relative_to(REPO)}:{no}: {line.strip()[:120]}")
    assert not hits, "machine paths in tracked files:\n" + "\n".join(hits)


def test_cited_references_exist():
    for name in ("algorithms.md", "theory-reference.md"):
        assert (REPO / "docs" / name).is_file(), name
