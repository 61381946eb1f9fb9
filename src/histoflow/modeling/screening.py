"""Whether a prediction can be trusted: quality and out-of-distribution screening, fitted with the model.

A classifier answers with confidence about anything that decodes (an all-black image was "non-IDC" at
0.98). Four checks flag such inputs; a flagged image keeps its probabilities, but its label becomes
INDETERMINATE:

- `low_tissue`: less than MIN_TISSUE of the image is stained (blank, background, a grey or transparent upload);
- `out_of_focus`: focus (histoflow.data.quality) below FOCUS_FACTOR x the FOCUS_PERCENTILE-th percentile of
  the validation images that have tissue;
- `out_of_distribution`: the Mahalanobis distance of the network's penultimate features (the input of its
  softmax layer) to the training images' features (Lee et al. 2018) above OOD_MARGIN x the
  OOD_PERCENTILE-th percentile of the validation images' distances;
- `unusual_colour`: the same distance for the image's colour histogram, above COLOUR_MARGIN x that
  percentile. A network trained for a few epochs maps a photograph of a cat close to tissue; its colours
  are not close to any stain.
The margins are there because the validation split holds few patients (BreaKHis: 9) and the next
patient's stain and tissue differ from theirs; what they change on the developer sets' test splits is
measured in docs/results.md ("Screening margins").

Both distances use the mean and the Ledoit-Wolf shrunk covariance of up to MAX_FIT_IMAGES training images
(the shrinkage keeps it invertible with fewer images than dimensions). Everything is fitted on the training
and validation splits and saved as one .npz file with the run (evaluation.SCREENING_ARTIFACT); the served
model loads it per network. A model logged before screening existed has no file: its predictions get only
the low_tissue check (a warning at load), never an error. Nothing here loads Keras: the served model applies
the checks without it (the features come from histoflow.modeling.inference.feature_model's second output).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoflow.data.quality import COLOUR, FOCUS, TISSUE

LOW_TISSUE, OUT_OF_FOCUS = "low_tissue", "out_of_focus"
OUT_OF_DISTRIBUTION, UNUSUAL_COLOUR = "out_of_distribution", "unusual_colour"
INDETERMINATE = "indeterminate"
MIN_TISSUE = 0.08
FOCUS_PERCENTILE, FOCUS_FACTOR = 1.0, 0.5
OOD_PERCENTILE = 99.5
OOD_MARGIN, COLOUR_MARGIN = 1.25, 1.5
MAX_FIT_IMAGES = 5000  # training images whose features estimate the mean and covariance


@dataclass(frozen=True)
class Distance:
    """Mahalanobis distance to a training distribution, in units of its threshold (NaN when not fitted)."""

    mean: np.ndarray
    precision: np.ndarray
    threshold: float

    @classmethod
    def fit(cls, train: np.ndarray, val: np.ndarray, margin: float = 1.0) -> Distance:
        # Fitting only: the served model loads this module without scikit-learn's ~1 s import (cold start).
        from sklearn.covariance import LedoitWolf

        covariance = LedoitWolf().fit(np.asarray(train, dtype=np.float64))
        unit = cls(covariance.location_, covariance.precision_, 1.0)
        return cls(unit.mean, unit.precision, margin * float(np.percentile(unit.scores(val), OOD_PERCENTILE)))

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Distance / threshold per row: above 1 is out of distribution."""
        if not np.isfinite(self.threshold):
            return np.full(len(x), np.nan)
        centred = np.asarray(x, dtype=np.float64).reshape(len(x), -1) - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, self.precision, centred), 0.0)) / self.threshold


NO_DISTANCE = Distance(np.zeros(0), np.zeros((0, 0)), float("nan"))


@dataclass(frozen=True)
class Screening:
    """The fitted checks of one network (thresholds NaN where not fitted: that check never flags)."""

    min_tissue: float
    min_focus: float
    features: Distance
    colour: Distance

    def save(self, path: str | Path) -> None:
        np.savez(path, min_tissue=self.min_tissue, min_focus=self.min_focus,
                 **{f"{name}_{field}": getattr(getattr(self, name), field) for name in ("features", "colour")
                    for field in ("mean", "precision", "threshold")})

    @classmethod
    def load(cls, path: str | Path) -> Screening:
        with np.load(path) as saved:
            distances = [Distance(saved[f"{name}_mean"], saved[f"{name}_precision"], float(saved[f"{name}_threshold"]))
                         for name in ("features", "colour")]
            return cls(float(saved["min_tissue"]), float(saved["min_focus"]), *distances)


UNFITTED = Screening(MIN_TISSUE, float("nan"), NO_DISTANCE, NO_DISTANCE)


def fit_screening(train_features: np.ndarray, train_quality: np.ndarray, val_features: np.ndarray,
                  val_quality: np.ndarray) -> Screening:
    """All checks from the training images (features, measure()'s rows) and the validation images'
    percentiles; the focus threshold from the validation images that have tissue."""
    with_tissue = val_quality[val_quality[:, TISSUE] >= MIN_TISSUE, FOCUS]
    min_focus = FOCUS_FACTOR * float(np.percentile(with_tissue, FOCUS_PERCENTILE)) if len(with_tissue) else 0.0
    return Screening(MIN_TISSUE, min_focus, Distance.fit(train_features, val_features, OOD_MARGIN),
                     Distance.fit(train_quality[:, COLOUR], val_quality[:, COLOUR], COLOUR_MARGIN))


def flags(quality: np.ndarray, ood_scores: np.ndarray, colour_scores: np.ndarray, screening: Screening
          ) -> list[list[str]]:
    """Per image, the checks it fails (quality: measure()'s rows; scores NaN where not fitted: no flag)."""
    result = []
    for row, ood, colour in zip(quality, ood_scores, colour_scores, strict=True):
        failed = []
        if row[TISSUE] < screening.min_tissue:
            failed.append(LOW_TISSUE)
        if row[FOCUS] < screening.min_focus:  # NaN threshold: never
            failed.append(OUT_OF_FOCUS)
        if ood > 1.0:
            failed.append(OUT_OF_DISTRIBUTION)
        if colour > 1.0:
            failed.append(UNUSUAL_COLOUR)
        result.append(failed)
    return result


def screen(quality: np.ndarray, features: np.ndarray, screening: Screening) -> list[list[str]]:
    """flags() of one network's images."""
    return flags(quality, screening.features.scores(features), screening.colour.scores(quality[:, COLOUR]),
                 screening)


def flagged_share(quality: np.ndarray, features: np.ndarray, screening: Screening) -> float:
    """The share of images that fail any check."""
    return float(np.mean([bool(f) for f in screen(quality, features, screening)]))
