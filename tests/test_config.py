from pathlib import Path

import pytest
import yaml

from histoflow.config import VARIANTS, make_config
from histoflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_variant_defaults_follow_the_reports():
    baseline = make_config("baseline")
    assert (baseline.learning_rate, baseline.dropout, baseline.augment) == (1e-3, 0.5, "none")
    assert make_config("augmented").augment == "seed"
    densenet = make_config("densenet")
    assert (densenet.backbone, densenet.learning_rate, densenet.dropout, densenet.fusion_width) == (
        "densenet121", 1e-5, 0.45, 64)
    assert densenet.weights == "imagenet" and densenet.image_size == 128 and densenet.batch_size == 64
    assert make_config("transfer").backbone == "mobilenet"


def test_string_parameters_are_coerced():
    config = make_config("densenet", epochs="3.0", freeze_backbone="true", learning_rate="1e-4",
                         max_images="100")
    assert (config.epochs, config.freeze_backbone, config.learning_rate, config.max_images) == (3, True, 1e-4, 100)


@pytest.mark.parametrize("overrides,message", [
    ({"dropout": "1.5"}, "dropout"),
    ({"learning_rate": "0"}, "learning_rate"),
    ({"epochs": "many"}, "epochs must be an integer"),
    ({"split": "random"}, "split must be"),
    ({"augment": "mixup"}, "augment must be"),
    ({"class_weight": "auto"}, "class_weight"),
    ({"backbone": "vgg16"}, "densenet variant"),
    ({"colour": "blue"}, "unknown parameter"),
    ({"freeze_backbone": "maybe"}, "freeze_backbone must be true or false"),
])
def test_bad_parameters_are_rejected_with_a_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config("densenet", **overrides)


def test_mlproject_defaults_match_the_config():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    for variant in VARIANTS:
        entry = project["entry_points"][variant]
        config = make_config(variant)
        for name, spec in entry["parameters"].items():
            expected = make_config(variant, **{name: str(spec["default"])})
            assert getattr(expected, name) == getattr(config, name), (variant, name)
            assert f"{{{name}}}" in entry["command"], (variant, name)


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
