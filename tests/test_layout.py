"""The house shows its plan: subpackages in the order of the flow, each importing only what comes before
it; the card's folders hold the files the code reads; the README draws the tree as it is."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "histoflow"
TOP_LEVEL = {"__init__", "errors", "config", "progress", "tracking", "artifacts", "workflow", "entrypoints", "cli"}
SUBPACKAGES = {"data", "modeling", "tuning", "serving", "registry"}


def test_every_module_lives_in_its_step():
    assert {p.stem for p in PACKAGE.glob("*.py")} == TOP_LEVEL
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} == SUBPACKAGES


def test_each_step_imports_only_the_steps_before_it():
    """The contracts of pyproject.toml, checked by import-linter on every import, deferred ones included: the layers
    of the data flow, and a served model that scores without TensorFlow."""
    result = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=REPO,
                            capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


def test_the_readme_draws_every_module():
    layout = REPO.joinpath("README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    for path in PACKAGE.rglob("*.py"):
        if path.stem != "__init__":
            assert re.search(rf"\b{path.stem}\b", layout), f"README layout lacks {path.relative_to(PACKAGE)}"
    for name in SUBPACKAGES:
        assert f"{name}/" in layout


def test_the_cards_folders_hold_what_the_code_reads():
    from histoflow.registry.policy import DEFAULT_POLICY
    from histoflow.tuning.search_space import DEFAULT_SEARCH_SPACE

    assert (REPO / DEFAULT_SEARCH_SPACE).is_file() and DEFAULT_SEARCH_SPACE.startswith("tuning/")
    assert (REPO / DEFAULT_POLICY).is_file() and DEFAULT_POLICY.startswith("registry/")
    for folder in ("tuning", "registry", "docker"):
        assert (REPO / folder / "README.md").is_file()


def test_the_code_passes_the_linter():
    """ruff, configured in pyproject.toml (pycodestyle, pyflakes, import order, bugbear, pyupgrade, simplify)."""
    result = subprocess.run([str(Path(sys.executable).with_name("ruff")), "check", "--no-cache", "src", "tests",
                             "bench", "docs"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
