"""Typed settings from strings and files: what MLflow Projects and the command line pass, and YAML.

Every entry point's settings are a frozen dataclass owned by the step it configures (the data step's
``DataConfig``, the training run's ``TrainConfig``, ...). This module holds only the machinery they
share: turning string parameters into typed fields (one boolean parser for every command), and
reading the YAML files a user edits (the search space in ``tuning/``, the promotion policy in
``registry/``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

from histoflow.errors import ConfigError

T = TypeVar("T")

TRUE = frozenset({"true", "1", "yes", "on"})
FALSE = frozenset({"false", "0", "no", "off"})
# A folder setting (image_cache, checkpoint_dir) with this value turns that folder off.
FOLDER_OFF = "none"
# A folder setting left at this default is derived: <cache root>/<kind>, never the working folder.
USER_CACHE = ""
CACHE_ENV = "HISTOFLOW_CACHE"
# Dataclass field annotations, as strings (`from __future__ import annotations`), and the types they name.
KINDS: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}
KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """A settings field with the sentence the command line shows for it (`histoflow <command> --help`)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def help_of(cls: type, name: str) -> str:
    """The help sentence of a settings field ("" when it has none)."""
    return next((f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name), "")


@dataclasses.dataclass(frozen=True)
class RunTarget:
    """Where an entry point's run goes; not a parameter of the run (MLflow Projects sets both itself)."""

    experiment: str = setting("", "the MLflow experiment (default: the `mlflow run` run's, "
                                  "MLFLOW_EXPERIMENT_NAME, or Default)")
    run_name: str = setting("", "the run's name (default: made of what the run does)")


RUN_TARGET_FIELDS = frozenset(f.name for f in dataclasses.fields(RunTarget))


def parse_bool(name: str, value: Any) -> bool:
    """true/false, 1/0, yes/no, on/off (any case); ConfigError otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE | FALSE:
        return text in TRUE
    raise ConfigError(f"parameter {name} must be true or false; got {value!r}")


def coerce(name: str, value: Any, kind: type) -> Any:
    """value as `kind`; strings such as MLflow Projects passes them ("3.0" for an integer) are converted."""
    if value is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is bool:
        return parse_bool(name, value)
    text = str(value).strip()
    try:
        if kind is int:
            number = float(text)
            if not number.is_integer():
                raise ValueError
            return int(number)
        return kind(text)
    except (ValueError, OverflowError):
        raise ConfigError(f"parameter {name} must be {KIND_NAMES[kind]}; got {value!r}") from None


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise ConfigError with the message of the first check that fails (a settings class's validate())."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def field_kinds(cls: type) -> dict[str, type]:
    """Field name -> type of a settings dataclass (`float | None`: float; nested settings left out)."""
    kinds = {f.name: (f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type)))
             .removesuffix(" | None") for f in dataclasses.fields(cls)}
    return {name: KINDS[kind] for name, kind in kinds.items() if kind in KINDS}


def typed_params(cls: type, params: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """The given parameters of `cls` as typed values; None or "" means "not given" and is left out.

    strict: a parameter `cls` does not have is an error naming the known ones; otherwise it is
    ignored (left for another settings class to take).
    """
    kinds = field_kinds(cls)
    unknown = sorted(set(params) - set(kinds))
    if strict and unknown:
        raise ConfigError(f"unknown parameter {unknown[0]!r}; known: {', '.join(sorted(kinds))}")
    return {k: coerce(k, v, kinds[k]) for k, v in params.items() if k in kinds and v is not None and v != ""}


def from_params(cls: type[T], params: dict[str, Any], base: T | None = None, strict: bool = True) -> T:
    """`base` (default: the class's defaults) with the given string or typed parameters applied."""
    return dataclasses.replace(base if base is not None else cls(), **typed_params(cls, params, strict))


def to_params(settings: Any) -> dict[str, Any]:
    """A settings dataclass as a flat parameter dict (what MLflow logs and MLflow Projects passes)."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


def cache_root() -> Path:
    """Where histoflow keeps what it can make again (decoded images, checkpoints of unfinished runs, backbone
    features): $HISTOFLOW_CACHE, else the user's cache directory (~/.cache/histoflow on Linux,
    ~/Library/Caches/histoflow on macOS, %LOCALAPPDATA%\\histoflow\\Cache on Windows). Never the working
    folder: `mlflow run .` runs in the project itself."""
    given = os.environ.get(CACHE_ENV, "").strip()
    if given:
        return Path(given).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("histoflow", appauthor=False))


def local_folder(setting: str, kind: str) -> Path | None:
    """A folder setting's folder: None when it is off (`none`), `<cache root>/<kind>` when left at its default
    (""), else the path given."""
    value = str(setting).strip()
    if value.lower() == FOLDER_OFF:
        return None
    return cache_root() / kind if value == USER_CACHE else Path(value).expanduser()


def project_root() -> Path | None:
    """The repository this package is installed from (editable installs), or None."""
    import histoflow

    root = Path(histoflow.__file__).resolve().parents[2]
    return root if (root / "MLproject").is_file() else None


def find_file(path: str | os.PathLike, what: str) -> Path:
    """A user-edited file: as given (absolute, or relative to the working folder), else relative to the project.

    `mlflow run .` runs in the project folder; `histoflow` run elsewhere still finds the project's
    own `tuning/` and `registry/` files.
    """
    given = Path(path).expanduser()
    candidates = [given]
    root = project_root()
    if not given.is_absolute() and root is not None:
        candidates.append(root / given)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{what} file {path} not found (looked in {', '.join(str(c.parent) for c in candidates)})")


def read_yaml(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A YAML mapping from a user-edited file, with errors that name the file."""
    import yaml

    found = find_file(path, what)
    try:
        content = yaml.safe_load(found.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} file {found} is not valid YAML: {exc}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{what} file {found} must hold a mapping of names to values; got {type(content).__name__}")
    return content
