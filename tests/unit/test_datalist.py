"""Datalist parsing: the reference's decathlon JSON, per-datalist roots, and errors that name the place."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

from ssl3d.config import ConfigError, DataConfig, DatalistConfig
from ssl3d.data.datalist import load_datalists


def _touch(*paths: Path) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def _write(path: Path, doc: object) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return str(path)


def _cfg(*lists: tuple[str, str | None]) -> DataConfig:
    return DataConfig(datalists=[DatalistConfig(json=j, root=r) for j, r in lists])


def test_two_datalists_with_their_own_roots(tmp_path: Path) -> None:
    # A: images next to the JSON (default root). B: the JSON in a jsons/ folder, images under another root.
    a_json = _write(
        tmp_path / "a" / "dataset_A.json",
        {
            "labels": {"0": "background"},  # extra top-level keys are fine
            "training": [{"image": "imagesTr/a0.nii.gz", "label": "ignored.nii.gz"}, "imagesTr/a1.nii.gz"],
            "validation": [{"image": "imagesTr/a2.nii.gz"}],
        },
    )
    absolute = tmp_path / "elsewhere" / "abs.nii.gz"
    b_json = _write(
        tmp_path / "jsons" / "dataset_B.json",
        {"training": ["b0.nii.gz", {"image": str(absolute)}], "validation": ["sub/b1.nii.gz"]},
    )
    _touch(
        tmp_path / "a" / "imagesTr" / "a0.nii.gz",
        tmp_path / "a" / "imagesTr" / "a1.nii.gz",
        tmp_path / "a" / "imagesTr" / "a2.nii.gz",
        tmp_path / "data_b" / "b0.nii.gz",
        tmp_path / "data_b" / "sub" / "b1.nii.gz",
        absolute,
    )
    train, val = load_datalists(_cfg((a_json, None), (b_json, str(tmp_path / "data_b"))))
    assert train == [
        {"image": str(tmp_path / "a" / "imagesTr" / "a0.nii.gz")},
        {"image": str(tmp_path / "a" / "imagesTr" / "a1.nii.gz")},
        {"image": str(tmp_path / "data_b" / "b0.nii.gz")},
        {"image": str(absolute)},
    ]
    assert val == [
        {"image": str(tmp_path / "a" / "imagesTr" / "a2.nii.gz")},
        {"image": str(tmp_path / "data_b" / "sub" / "b1.nii.gz")},
    ]
    assert all(os.path.isabs(e["image"]) for e in train + val)


def test_relative_root_and_json_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "lists" / "d.json", {"training": ["x.nii.gz"], "validation": ["y.nii.gz"]})
    _touch(tmp_path / "imgs" / "x.nii.gz", tmp_path / "imgs" / "y.nii.gz")
    train, val = load_datalists(_cfg(("lists/d.json", "imgs")))
    assert train == [{"image": str(tmp_path / "imgs" / "x.nii.gz")}]
    assert val == [{"image": str(tmp_path / "imgs" / "y.nii.gz")}]


def test_missing_validation_holds_out_a_seeded_split(tmp_path: Path) -> None:
    names = [f"v{i}.nii.gz" for i in range(40)]
    j = _write(tmp_path / "d.json", {"training": names})
    _touch(*(tmp_path / n for n in names))
    with pytest.warns(UserWarning, match=r"no validation list; holding out 2 of 40"):
        train, val = load_datalists(_cfg((j, None)), seed=3)
    assert len(train) == 38 and len(val) == 2
    assert not {e["image"] for e in train} & {e["image"] for e in val}
    with pytest.warns(UserWarning):
        assert load_datalists(_cfg((j, None)), seed=3)[1] == val  # same seed, same split
    with pytest.warns(UserWarning):
        others = [load_datalists(_cfg((j, None)), seed=s)[1] for s in range(4, 8)]
    assert any(o != val for o in others)


def test_single_volume_without_validation_is_used_for_both(tmp_path: Path) -> None:
    j = _write(tmp_path / "d.json", {"training": ["only.nii.gz"]})
    _touch(tmp_path / "only.nii.gz")
    with pytest.warns(UserWarning, match="validating on that volume"):
        train, val = load_datalists(_cfg((j, None)))
    assert train == val == [{"image": str(tmp_path / "only.nii.gz")}]


def test_a_datalist_with_validation_does_not_warn(tmp_path: Path) -> None:
    j = _write(tmp_path / "d.json", {"training": ["a.nii.gz"], "validation": ["b.nii.gz"]})
    _touch(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_datalists(_cfg((j, None)))


@pytest.mark.parametrize(
    ("doc", "pattern"),
    [
        ({"validation": []}, r'no "training" key \(keys found: "validation"\); expected \{"training"'),
        ({"training": {"image": "a.nii.gz"}}, r'"training" is dict; expected a list'),
        ({"training": ["a.nii.gz", {"label": "l.nii.gz"}]}, r'"training"\[1\] has no "image" key .*"label"'),
        ({"training": ["a.nii.gz"], "validation": [{"image": 3}]}, r'"validation"\[0\] image is 3; expected one path'),
        ({"training": [["a.nii.gz", "b.nii.gz"]]}, r'"training"\[0\] image is \["a.nii.gz", "b.nii.gz"\]'),
        ({"training": []}, r"no training volumes"),
        (["a.nii.gz"], r"expected a JSON object at the top level"),
    ],
)
def test_errors_name_the_file_and_the_entry(tmp_path: Path, doc: object, pattern: str) -> None:
    j = _write(tmp_path / "bad_list.json", doc)
    _touch(tmp_path / "a.nii.gz")
    with pytest.raises(ConfigError, match=pattern) as err:
        load_datalists(_cfg((j, None)))
    assert "bad_list.json" in str(err.value)
    assert len(err.value.problems) == 1 and "\n" not in err.value.problems[0]


def test_invalid_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text('{"training": [')
    with pytest.raises(ConfigError, match=r"datalist file .*broken.json: invalid JSON at line 1"):
        load_datalists(_cfg((str(bad), None)))
    with pytest.raises(ConfigError, match=r"datalist file .*nope.json: not found"):
        load_datalists(_cfg((str(tmp_path / "nope.json"), None)))


def test_missing_images_are_reported_with_file_key_and_index(tmp_path: Path) -> None:
    j = _write(tmp_path / "d.json", {"training": ["here.nii.gz", "gone.nii.gz"], "validation": ["gone2.nii.gz"]})
    _touch(tmp_path / "here.nii.gz")
    with pytest.raises(ConfigError) as err:
        load_datalists(_cfg((j, None)))
    assert len(err.value.problems) == 2
    assert '"training"[1]' in err.value.problems[0] and "gone.nii.gz not found" in err.value.problems[0]
    assert '"validation"[0]' in err.value.problems[1] and "d.json" in err.value.problems[1]
    train, val = load_datalists(_cfg((j, None)), check_files=False)  # e.g. paths on another machine
    assert len(train) == 2 and len(val) == 1


def test_no_datalists_is_an_error_here(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.datalists: empty"):
        load_datalists(DataConfig())
