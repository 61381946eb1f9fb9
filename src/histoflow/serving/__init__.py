"""The served model: requests (decoding and limits) -> classifier (the pyfunc) -> model_code (its
models-from-code file); batch_predict scores a folder with a registered model."""

# Models registered before the subpackages named their code `histoflow.serving.ImageClassifier`; a
# process that has this package imported (promote, predict) loads them through this name.
from histoflow.serving.classifier import ImageClassifier  # noqa: F401
