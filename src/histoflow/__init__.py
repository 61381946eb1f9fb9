"""histoflow: MLflow-tracked experiments for breast cancer histopathology classification."""

__version__ = "0.1.0"
