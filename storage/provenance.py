"""Provenance: which training code produced a commit (GitPython, when run inside a git tree)."""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Any


def code_provenance(cwd: Path | None = None) -> dict[str, Any]:
    """Repository, HEAD commit and dirty flag of the git working tree around `cwd`, if any.

    Dirty means tracked files changed (git's own `--dirty` sense); untracked files such as the
    store itself do not count.
    """
    try:
        import git
    except ImportError:  # GitPython needs a git executable; without one there is no provenance
        return {}
    try:
        repo = git.Repo(cwd or Path.cwd(), search_parent_directories=True)
        head = repo.head.commit.hexsha if repo.head.is_valid() else None
        return {
            "repo": repo.working_tree_dir,
            "commit": head,
            "dirty": repo.is_dirty(untracked_files=False),
        }
    except (git.InvalidGitRepositoryError, git.NoSuchPathError, git.GitCommandError, ValueError):
        return {}


def author() -> str:
    """`ADB_AUTHOR`, else the login name."""
    try:
        return os.environ.get("ADB_AUTHOR") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
