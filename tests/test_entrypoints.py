"""Entry points: the MLproject is rendered from the settings classes and is current; the command line,
the MLproject and conda.yaml describe the same commands and environment."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from conftest import BREAKHIS, REPO
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


@pytest.mark.parametrize("command", ["train", "tune", "cv", "data", "main", "download", "compare", "register",
                                     "promote", "rollback", "predict", "app"])
def test_help_says_what_each_setting_means(command, capsys):
    from histoflow.cli import _parser

    parameters = cli_parameters(command)
    assert all(p.help for p in parameters), [p.name for p in parameters if not p.help]
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    for p in parameters:
        assert f"--{p.name}" in shown and " ".join(p.help.split()[:4]) in shown, p.name


def test_the_command_line_answers_without_loading_tensorflow_or_mlflow():
    """`histoflow --help`, `histoflow <command> --help` and a bad parameter need only the settings modules (6 s of
    imports before: TensorFlow, Keras, MLflow)."""
    import subprocess
    import sys

    code = ("import sys\nfrom histoflow.cli import main\n"
            "for args in (['--help'], ['train', '--help'], ['tune', '--help'], ['main', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            "assert main(['train', '--variant', 'densenet', '--dropout', '2']) == 2\n"
            "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'mlflow'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout and "dropout must be in [0, 1)" in out.stderr
    assert "usage: histoflow train" in out.stdout and "--learning_rate" in out.stdout


def test_the_data_and_registry_steps_run_without_loading_tensorflow(tmp_path):
    """The data step runs, and register, compare and promote read runs and aliases, with MLflow alone (each
    `mlflow run` of them paid ~8 s of TensorFlow import before); TensorFlow comes when a model is loaded or
    logged."""
    import subprocess
    import sys

    code = ("import sys, mlflow\nimport histoflow.registry.aliases, histoflow.registry.comparison, "
            "histoflow.registry.promotion\nfrom histoflow.cli import main\n"
            f"mlflow.set_tracking_uri('sqlite:///{tmp_path / 'mlflow.db'}')\n"
            f"assert main(['data', '--data_dir', '{BREAKHIS}', '--max_images', '60']) == 0\n"
            "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout and "60 images of" in out.stdout


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
