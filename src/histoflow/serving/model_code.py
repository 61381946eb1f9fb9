"""MLflow models-from-code entry: the file `mlflow.pyfunc.log_model(python_model=...)` points at."""

from mlflow.models import set_model

from histoflow.serving.classifier import ImageClassifier

set_model(ImageClassifier())
