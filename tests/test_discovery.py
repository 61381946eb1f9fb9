import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import BREAKHIS, IDC, copy_tree_subset, idc_patient_dirs
from histoflow.data.discovery import BREAKHIS_NAME, IDC_NAME, detect_layout, discover
from histoflow.errors import DataError


def test_breakhis_layout_and_parsing_on_real_files():
    ds = discover(BREAKHIS)
    assert ds.layout == "breakhis"
    assert ds.class_names == ["benign", "malignant"]
    frame = ds.frame
    # Counts from shared/data/README.md: 709 images, 52 patient folders in 46 groups.
    assert len(frame) == 709
    assert frame["patient"].nunique() == 52
    assert frame["group"].nunique() == 46
    assert (frame["label"] == 1).sum() == 501
    row = frame[frame["relpath"].str.endswith("SOB_B_A-14-22549AB-40-001.png")].iloc[0]
    assert (row.label, row.patient, row.group, row.subtype, row.magnification) == (
        0, "SOB_B_A_14-22549AB", "14-22549", "adenosis", "40")
    # Folders sharing a slide number are one patient group for splitting.
    assert set(frame[frame["group"] == "14-22549"]["patient"]) == {
        "SOB_B_A_14-22549AB", "SOB_B_A_14-22549CD", "SOB_B_A_14-22549G"}
    assert set(frame[frame["group"] == "14-29960"]["subtype"]) == {"adenosis", "fibroadenoma"}
    assert len(ds.digest) == 16


def test_breakhis_magnification_filter():
    frame = discover(BREAKHIS, magnification="400").frame
    assert len(frame) == 21 and set(frame["magnification"]) == {"400"}
    assert len(discover(BREAKHIS, magnification="200X").frame) == 628
    with pytest.raises(DataError, match="magnification"):
        discover(BREAKHIS, magnification="25")


def test_idc_layout_and_parsing_on_real_files():
    ds = discover(IDC, max_images=300, seed=1)
    assert ds.layout == "idc"
    assert ds.class_names == ["non-IDC", "IDC"]
    for row in ds.frame.itertuples():
        match = IDC_NAME.match(Path(row.path).name)
        assert match and int(match["cls"]) == row.label and match["patient"] == row.patient
        assert Path(row.path).parent.name == str(row.label)  # class folder agrees with the name
    # Subsampling keeps the class mix (7,455 / 2,748 in the full set) and many patients.
    share = ds.frame["label"].mean()
    assert abs(share - 2748 / 10203) < 0.02
    assert ds.frame["patient"].nunique() > 50


def test_full_idc_counts_match_readme():
    frame = discover(IDC).frame
    assert len(frame) == 10203 and frame["patient"].nunique() == 223
    assert (frame["label"] == 1).sum() == 2748


def test_folders_layout_with_and_without_split_folders(tmp_path):
    benign = sorted((BREAKHIS / "BreaKHis_v1/histology_slides/breast/benign").rglob("*.png"))[:6]
    malignant = sorted((BREAKHIS / "BreaKHis_v1/histology_slides/breast/malignant").rglob("*.png"))[:6]
    flat = tmp_path / "flat"
    for cls, files in (("malignant", malignant), ("benign", benign)):
        (flat / cls).mkdir(parents=True)
        for i, f in enumerate(files):
            shutil.copy(f, flat / cls / f"slide{i}.png")
    ds = discover(flat)
    assert ds.layout == "folders"
    assert ds.class_names == ["benign", "malignant"]
    assert ds.frame["patient"].nunique() == 12  # no patient information: one group per image
    assert ds.frame["source_split"].isna().all()

    # BreaKHis names re-sorted into class folders still give patients from the name.
    resorted = tmp_path / "resorted"
    for cls, files in (("malignant", malignant), ("benign", benign)):
        (resorted / cls).mkdir(parents=True)
        for f in files:
            shutil.copy(f, resorted / cls / f.name)
    ds = discover(resorted)
    assert ds.layout == "breakhis"
    expected = {f.name.split("-")[0].replace("-", "_") + "_" + "-".join(f.name.split("-")[1:3])
                for f in benign + malignant}
    assert set(ds.frame["patient"]) == expected

    kaggle = tmp_path / "kaggle"
    for split, part in (("train", slice(0, 4)), ("valid", slice(4, 5)), ("test", slice(5, 6))):
        for cls, files in (("0", benign), ("1", malignant)):
            (kaggle / split / cls).mkdir(parents=True)
            for i, f in enumerate(files[part]):
                shutil.copy(f, kaggle / split / cls / f"tile{i}.png")
    ds = discover(kaggle)
    assert ds.layout == "folders" and ds.class_names == ["0", "1"]
    assert ds.frame["source_split"].value_counts().to_dict() == {"train": 8, "val": 2, "test": 2}


def test_groups_csv_gives_patients(tmp_path):
    files = sorted((BREAKHIS / "BreaKHis_v1/histology_slides/breast").rglob("*.png"))[::60][:10]
    rows = []
    for i, f in enumerate(files):
        cls = "malignant" if "/malignant/" in str(f) else "benign"
        dest = tmp_path / cls / f"image{i}.png"
        dest.parent.mkdir(exist_ok=True)
        shutil.copy(f, dest)
        rows.append({"path": f"{cls}/image{i}.png", "group": f.parent.parent.name})
    pd.DataFrame(rows).to_csv(tmp_path / "groups.csv", index=False)
    ds = discover(tmp_path, layout="folders")
    assert dict(zip(ds.frame["relpath"], ds.frame["patient"], strict=True)) == {r["path"]: r["group"] for r in rows}


def test_corrupt_and_fake_images_are_reported_and_skipped(tmp_path):
    patients = idc_patient_dirs(3)
    files = sorted(f for p in patients for f in p.rglob("*.png"))
    copy_tree_subset(files, IDC, tmp_path)
    victim = tmp_path / files[0].relative_to(IDC)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated PNG
    fake = tmp_path / patients[1].name / "1" / f"{patients[1].name}_idx5_x1_y1_class1.png"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("this is not an image\n")
    empty = tmp_path / patients[2].name / "0" / f"{patients[2].name}_idx5_x2_y2_class0.png"
    empty.parent.mkdir(exist_ok=True)
    empty.write_bytes(b"")
    ds = discover(tmp_path)
    skipped = dict(zip(ds.skipped["relpath"], ds.skipped["reason"], strict=True))
    assert set(skipped) == {str(p.relative_to(tmp_path)) for p in (victim, fake, empty)}
    assert "truncated" in skipped[str(victim.relative_to(tmp_path))]
    assert "not an image" in skipped[str(fake.relative_to(tmp_path))]
    assert "empty" in skipped[str(empty.relative_to(tmp_path))]
    assert len(ds.frame) == len(files) - 1  # only the truncated file replaced a real patch; nothing else lost
    assert ds.report()["skipped"] and all(r["reason"] for r in ds.report()["skipped"])


def test_empty_one_class_and_unknown_layouts_fail_fast(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"no image files .* found 1 other"):
        discover(tmp_path / "empty")
    one_class = tmp_path / "one"
    files = sorted((IDC / idc_patient_dirs(1)[0].name / "0").glob("*.png"))[:5]
    copy_tree_subset(files, IDC, one_class)
    with pytest.raises(DataError, match="only one class"):
        discover(one_class)
    loose = tmp_path / "loose"
    loose.mkdir()
    for f in files:
        shutil.copy(f, loose / f"tile{f.stat().st_size}.png")
    with pytest.raises(DataError, match="unknown layout"):
        discover(loose)
    with pytest.raises(DataError, match="layout must be"):
        discover(BREAKHIS, layout="kaggle")


def test_detect_layout_uses_file_names():
    assert detect_layout([Path("a/SOB_M_DC-14-2523-400-001.png")]) == "breakhis"
    assert detect_layout([Path("10253/1/10253_idx5_x1_y2_class1.png")]) == "idc"
    assert detect_layout([Path("cats/a.png")]) == "folders"
    assert BREAKHIS_NAME.match("SOB_B_F-15-190EF-200-501.png")["slide"] == "190EF"


def test_max_images_counts_readable_images_only(tmp_path):
    """Unreadable files are replaced by other images of their class, not subtracted from max_images."""
    files = sorted(f for p in idc_patient_dirs(6) for f in p.rglob("*.png"))
    copy_tree_subset(files, IDC, tmp_path)
    copies = sorted(tmp_path.rglob("*.png"))
    for victim in copies[::2]:  # half of every patient's patches, of both classes
        victim.write_bytes(b"not a png")
    everything = discover(tmp_path)
    assert len(everything.frame) == len(copies) - len(copies[::2])
    for seed in (1, 2):
        ds = discover(tmp_path, max_images=40, seed=seed)
        assert len(ds.frame) == 40 and ds.frame["relpath"].is_unique
        assert not ds.skipped.empty and set(ds.skipped["relpath"]) <= set(everything.skipped["relpath"])
        share = ds.frame["label"].mean()
        assert abs(share - everything.frame["label"].mean()) < 0.1  # still stratified by label
    assert discover(tmp_path, max_images=40, seed=1).digest == discover(tmp_path, max_images=40, seed=1).digest


def test_a_file_is_decoded_again_only_when_it_changed(tmp_path, caplog):
    """Discovery remembers its checks (histoflow.data.file_checks): a file left as it was is not decoded again;
    one changed since, even to the same size with its old modification time, is; one modified within seconds
    of its check is not remembered at all. The digest is the same either way."""
    import os
    import time

    data, store = tmp_path / "data", tmp_path / "cache" / "checks.sqlite"
    files = sorted(f for p in idc_patient_dirs(2) for f in p.rglob("*.png"))
    copy_tree_subset(files, IDC, data)
    fresh = discover(data, checks_store=store)
    assert fresh.remembered_checks == 0 and len(fresh.frame) == len(files)
    assert discover(data, checks_store=store).remembered_checks == 0  # just written: not remembered
    time.sleep(2.1)  # file_checks.RACY_SECONDS
    assert discover(data, checks_store=store).remembered_checks == 0
    again = discover(data, checks_store=store)
    assert again.remembered_checks == len(files) and again.digest == fresh.digest
    assert again.frame.equals(fresh.frame)

    victim = sorted(data.rglob("*.png"))[0]
    before = victim.stat()
    victim.write_bytes(b"\0" * before.st_size)  # same size, and the old modification time put back
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    changed = discover(data, checks_store=store)
    assert changed.remembered_checks == len(files) - 1
    assert changed.skipped["relpath"].tolist() == [str(victim.relative_to(data))]

    # A store that cannot be opened: every file is checked, with one warning.
    (tmp_path / "not-a-folder").write_text("")
    unstored = discover(data, checks_store=tmp_path / "not-a-folder" / "checks.sqlite")
    assert unstored.remembered_checks == 0 and unstored.digest == changed.digest
    assert sum("cannot be used" in r.getMessage() for r in caplog.records) == 1
