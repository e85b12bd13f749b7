"""This library's own version, recorded in every saved suite.

Not `importlib.metadata.version("dictionary_learning")`: that names whatever distribution is
installed under the name, e.g. PyPI's unrelated `dictionary-learning`, not the code running here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

__version__ = "0.1.0"

_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    """The commit of the checkout this code runs from ("<sha>-dirty" when tracked files differ
    from it); None when the code is not in a git checkout or git is unavailable."""
    if not (_ROOT / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(_ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(_ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha
