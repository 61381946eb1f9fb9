"""Errors that carry a message meant for the user (the CLI prints them without a traceback)."""


class HistoflowError(Exception):
    """Base class: a problem the user can fix (bad data, bad parameter, unreachable service)."""


class DataError(HistoflowError):
    """The dataset cannot be used as given (empty, one class, unknown layout, missing folder)."""


class ConfigError(HistoflowError):
    """A parameter is out of range or inconsistent with others."""


class ImageDecodeError(HistoflowError):
    """One image file cannot be decoded (not an image, truncated, too large, empty)."""


class WeightsError(HistoflowError):
    """Pretrained weights are unavailable (offline, wrong path)."""


class TrackingError(HistoflowError):
    """The MLflow tracking server cannot be reached."""
