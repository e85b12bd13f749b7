"""Saved suites record this library's own version and commit, never an installed namesake's."""

import importlib.metadata
import json
import shutil
import subprocess
from pathlib import Path

import pytest

import dictionary_learning
from dictionary_learning.dictionary import AutoEncoderTopK, TopKTranscoder
from dictionary_learning.suite_io import library_versions, save_suite
from dictionary_learning.version import git_commit

ROOT = Path(dictionary_learning.__file__).resolve().parent.parent


@pytest.fixture
def pypi_namesake(monkeypatch):
    """Pretend PyPI's `dictionary-learning` 9.9.9 is installed (importlib.metadata answers)."""
    real = importlib.metadata.version

    def version(name):
        if name.replace("-", "_").lower() == "dictionary_learning":
            return "9.9.9"
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert importlib.metadata.version("dictionary-learning") == "9.9.9"


def test_versions_name_this_code_not_an_installed_namesake(pypi_namesake, tmp_path):
    versions = library_versions()
    assert versions["scae"] == dictionary_learning.__version__
    assert "9.9.9" not in versions.values()
    save_suite(tmp_path / "s", {"attn_0": AutoEncoderTopK(4, 8, 2),
                                "mlp_0": TopKTranscoder(4, 4, 8, 2)}, {})
    saved = json.loads((tmp_path / "s" / "config.json").read_text())["versions"]
    assert saved["scae"] == dictionary_learning.__version__
    assert saved["scae_commit"] == versions["scae_commit"]
    assert "9.9.9" not in saved.values()


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("git") is None,
                    reason="not running from a git checkout")
def test_commit_is_the_checkout_head():
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    commit = git_commit()
    assert commit in (head, f"{head}-dirty")
    assert library_versions()["scae_commit"] == commit


def test_commit_unavailable_outside_a_checkout(monkeypatch, tmp_path):
    import dictionary_learning.version as v

    monkeypatch.setattr(v, "_ROOT", tmp_path)
    assert v.git_commit() is None
    monkeypatch.setattr("dictionary_learning.suite_io.git_commit", v.git_commit)
    assert library_versions()["scae_commit"] == "unavailable"
