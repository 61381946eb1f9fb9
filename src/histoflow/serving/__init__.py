"""The served model: requests (decoding and limits) -> classifier (the pyfunc) on onnx_network (ONNX Runtime)
or keras_network (TensorFlow) -> model_code (its models-from-code file); batching (requests sharing forward
passes); http_errors (its scoring server's answers to malformed requests); packaging logs it (ONNX export, the
served code, requirements); batch_predict scores a folder with a registered model."""


def __getattr__(name: str):
    # Models registered before the subpackages named their code `histoflow.serving.ImageClassifier`; a process
    # that loads one finds the class through this name. Imported on that first use only: the command line reads
    # this package's settings without loading TensorFlow.
    if name == "ImageClassifier":
        from histoflow.serving.classifier import ImageClassifier

        return ImageClassifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
