"""Typed settings from strings: one boolean parser and one coercion for every command and file."""

import os
from dataclasses import dataclass

import pytest

from histoflow.config import coerce, find_file, from_params, parse_bool, read_yaml
from histoflow.errors import ConfigError


@pytest.mark.parametrize("text,value", [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True),
                                        ("false", False), ("0", False), ("No", False), ("off", False)])
def test_one_boolean_parser(text, value):
    assert parse_bool("flag", text) is value
    assert coerce("flag", text, bool) is value


def test_coerce_numbers_as_mlflow_projects_passes_them():
    assert coerce("n", "3.0", int) == 3 and coerce("n", 7, int) == 7 and coerce("x", "1e-4", float) == 1e-4
    for bad, kind in (("2.5", int), ("1e400", int), ("ten", float), ("maybe", bool)):
        with pytest.raises(ConfigError, match="parameter n must be"):
            coerce("n", bad, kind)


@dataclass(frozen=True)
class Example:
    size: int = 8
    rate: float = 0.5
    name: str = "a"
    limit: float | None = None


def test_from_params_applies_given_values_and_names_unknown_ones():
    assert from_params(Example, {"size": "16", "rate": "", "limit": "0.25"}) == Example(size=16, limit=0.25)
    with pytest.raises(ConfigError, match="unknown parameter 'colour'; known: limit, name, rate, size"):
        from_params(Example, {"colour": "red"})


def test_files_are_found_from_the_working_folder_or_the_project(tmp_path):
    # The tests run in a temporary folder: the project's own files are found through the project root.
    assert find_file("registry/gate.yaml", "promotion policy").is_file()
    (tmp_path / "mine.yaml").write_text("a: 1\n")
    assert read_yaml("mine.yaml", "example") == {"a": 1} and os.getcwd() == str(tmp_path)
    with pytest.raises(ConfigError, match="example file nothing.yaml not found"):
        find_file("nothing.yaml", "example")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        read_yaml("list.yaml", "example")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        read_yaml("broken.yaml", "example")
