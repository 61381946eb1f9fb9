"""Entry points: the MLproject is rendered from the settings classes and is current; the command line,
the MLproject and conda.yaml describe the same commands and environment."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from conftest import REPO
from histoflow.config import coerce
from histoflow.entrypoints import cli_parameters, entry_points, render_mlproject
from histoflow.modeling.variants import VARIANTS


def test_mlproject_is_rendered_from_the_settings_classes():
    assert (REPO / "MLproject").read_text() == render_mlproject(), "MLproject is stale: run `histoflow mlproject`"


def test_every_declared_parameter_reaches_its_command_with_its_default():
    project = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    points = {p.name: p for p in entry_points()}
    assert set(project) == set(points)
    for name, point in points.items():
        entry = project[name]
        declared = {p.name: p for p in point.parameters if not p.optional}
        assert set(entry.get("parameters", {})) == set(declared), name
        for param_name, spec in entry["parameters"].items():
            param = declared[param_name]
            assert f"--{param_name} {{{param_name}}}" in " ".join(entry["command"].split()), (name, param_name)
            if param.default is dataclasses.MISSING:
                assert "default" not in spec
            else:  # the YAML default, read back as the command line would, is the code's default
                assert coerce(param_name, str(spec["default"]), param.kind) == param.default, (name, param_name)
        # What the MLproject accepts, the command line accepts.
        accepted = {p.name for p in cli_parameters("train" if name in VARIANTS else name)}
        assert {p.name for p in point.parameters} - {"variant"} <= accepted, name


def test_derived_settings_are_not_declared(tmp_path):
    """`mlflow run` logs declared parameters as given: a placeholder would be logged instead of the value used."""
    points = {p.name: p for p in entry_points()}
    tune = {p.name for p in points["tune"].parameters if p.optional}
    assert {"backbone", "alpha", "learning_rate", "dropout", "fusion_width", "study_name", "split_table"} <= tune
    assert {p.name for p in points["promote"].parameters if p.optional} >= {"data_dir", "min_recall"}
    assert all(p.default not in ("", None) for point in points.values() for p in point.parameters
               if not p.optional)


def test_mlproject_command_writes_and_checks(tmp_path, capsys):
    from histoflow.cli import main

    assert main(["mlproject", "--output", str(tmp_path / "MLproject")]) == 0
    assert (tmp_path / "MLproject").read_text() == (REPO / "MLproject").read_text()
    assert main(["mlproject", "--check", "--output", str(tmp_path / "MLproject")]) == 0
    (tmp_path / "MLproject").write_text("name: stale\n")
    assert main(["mlproject", "--check", "--output", str(tmp_path / "MLproject")]) == 1
    assert "out of date" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "tune", "data", "main", "promote", "predict"])
def test_help_lists_the_settings(command, capsys):
    from histoflow.cli import _parser

    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert all(f"--{p.name}" in shown for p in cli_parameters(command))


def test_conda_yaml_describes_the_pyproject_environment():
    """Users with conda get the environment the tests ran in: every runtime requirement, at a version
    pyproject allows."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())["dependencies"]
    python = next(d for d in conda if isinstance(d, str) and d.startswith("python="))
    assert Version(python.split("=")[1]) in Requirement(f"python{project['requires-python']}").specifier
    pinned = {Requirement(line).name: Requirement(line) for d in conda if isinstance(d, dict)
              for line in d["pip"] if not line.startswith("-")}
    for line in project["dependencies"]:
        required = Requirement(line)
        assert required.name in pinned, f"conda.yaml lacks {required.name}"
        pins = [s.version for s in pinned[required.name].specifier if s.operator == "=="]
        assert all(Version(v) in required.specifier for v in pins), (required, pinned[required.name])


def test_ci_installs_the_pinned_versions_pyproject_allows():
    """.ci/run installs with constraints.txt: every requirement of the package and its extras is pinned there,
    at a version pyproject allows, so that a release elsewhere cannot change what a landing is tested with."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    assert "-c constraints.txt" in (REPO / ".ci" / "run").read_text()
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version.strip())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]:
        required = Requirement(line)
        if required.marker is not None and not required.marker.evaluate():
            continue  # another platform's
        name = canonicalize_name(required.name)
        assert name in pins, f"constraints.txt lacks {required.name}"
        assert pins[name] in required.specifier, (required, pins[name])
