"""Where a run keeps what later steps read: artifact paths and the tag of a cross-validation. Kept apart from
the code that writes them so that reading a run (register, compare, the registry's checks) needs neither
TensorFlow nor the training code."""

from __future__ import annotations

# The data step's split table (path, patient, label and split of every image): the later steps read it.
SPLIT_TABLE = "data/split.csv"
MODEL_ARTIFACT = "model"
KERAS_ARTIFACT_DIR = "keras"
# The serving pyfunc (histoflow.serving.classifier): the model `register` registers.
CLASSIFIER_ARTIFACT = "classifier"
# The stain reference fitted on the training split (stain_norm other than none): the served model applies it.
STAIN_ARTIFACT = "data/stain_reference.json"
# Keras's TensorBoard logs of the fit (`tensorboard --logdir` on the downloaded folder).
TENSORBOARD_ARTIFACT = "tensorboard"
# Temperature and threshold fitted on validation: the registered serving model applies them.
CALIBRATION_ARTIFACT = "evaluation/calibration.json"
# Quality and out-of-distribution checks fitted on training and validation: the served model applies them.
SCREENING_ARTIFACT = "evaluation/screening.npz"
# A cross-validation's pooled out-of-fold predictions and its patient folds.
PREDICTIONS_ARTIFACT = "evaluation/{split}_predictions.json"  # a split's images, labels and probabilities
OOF_ARTIFACT = "cv/oof_predictions.csv"
FOLDS_ARTIFACT = "cv/folds.csv"
CV_STEP = "cv"  # the parent run's histoflow.step tag


def is_cross_validation(run) -> bool:
    """Whether an MLflow run is a cross-validation's parent run (its results are the folds' means)."""
    return run.data.tags.get("histoflow.step") == CV_STEP
