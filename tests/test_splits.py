import pytest

from conftest import BREAKHIS, IDC
from histoflow.data.discovery import discover
from histoflow.data.splits import patient_overlap, split_dataset
from histoflow.errors import DataError


@pytest.fixture(scope="module")
def breakhis():
    return discover(BREAKHIS).frame


@pytest.fixture(scope="module")
def idc():
    return discover(IDC, max_images=2000, seed=3).frame


@pytest.mark.parametrize("which", ["breakhis", "idc"])
def test_patient_split_is_disjoint_stratified_and_sized(which, request):
    frame = request.getfixturevalue(which)
    split = split_dataset(frame, "patient", seed=7)
    assert patient_overlap(split) == set()
    # No patient folder either (BreaKHis groups hold several patient folders).
    assert split.groupby("patient")["split"].nunique().max() == 1
    sizes = split["split"].value_counts(normalize=True)
    assert 0.45 < sizes["train"] < 0.75 and 0.1 < sizes["val"] < 0.3 and 0.1 < sizes["test"] < 0.3
    overall = frame["label"].mean()
    for name in ("train", "val", "test"):
        assert abs(split.loc[split["split"] == name, "label"].mean() - overall) < 0.15


def test_patient_split_is_deterministic_for_a_seed(breakhis):
    a = split_dataset(breakhis, "patient", seed=11)
    b = split_dataset(breakhis, "patient", seed=11)
    c = split_dataset(breakhis, "patient", seed=12)
    assert a["split"].tolist() == b["split"].tolist()
    assert a["split"].tolist() != c["split"].tolist()


def test_image_split_is_leaky_and_stratified(idc):
    split = split_dataset(idc, "image", seed=7)
    assert len(patient_overlap(split)) > 50  # the reports' split mixes patients across splits
    sizes = split["split"].value_counts(normalize=True)
    assert abs(sizes["test"] - 0.2) < 0.01 and abs(sizes["val"] - 0.2) < 0.01
    overall = idc["label"].mean()
    for name in ("train", "val", "test"):
        assert abs(split.loc[split["split"] == name, "label"].mean() - overall) < 0.01


def test_too_few_patients_fails_with_a_message(breakhis):
    few = breakhis[breakhis["group"].isin(sorted(breakhis["group"].unique())[:3])]
    with pytest.raises(DataError, match="patient groups"):
        split_dataset(few, "patient")


def test_predefined_split_needs_split_folders(breakhis):
    with pytest.raises(DataError, match="predefined"):
        split_dataset(breakhis, "predefined")
