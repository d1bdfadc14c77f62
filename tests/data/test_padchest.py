from __future__ import annotations

import gzip

import pytest

from xray_train.config import data_config
from xray_train.data import padchest as reader
from xray_train.data.records import Finding
from xray_train.data.registry import read_dataset
from xray_train.errors import DataError


def _check_invariant(result):
    assert len(result.examples) + sum(result.skipped.values()) == result.rows_total


def _read(padchest, rows, **kw):
    result = reader.read(padchest.build(rows, **kw))
    _check_invariant(result)
    return result


def _only(padchest, **overrides):
    result = _read(padchest, [padchest.row(0, **overrides)])
    assert len(result.examples) == 1, result.skipped
    return result.examples[0]


def _skip_reason(padchest, **overrides):
    result = _read(padchest, [padchest.row(0, **overrides)])
    assert not result.examples
    assert sum(result.skipped.values()) == 1
    return next(iter(result.skipped))


# --- label parsing ------------------------------------------------------------------------------


def test_physician_nested_sentences_attach_locations_per_sentence(padchest):
    ex = _only(padchest, **padchest.PHYSICIAN)
    assert ex.findings == [
        Finding("pulmonary fibrosis", ("basal bilateral",)),
        Finding("chronic changes"),
        Finding("kyphosis"),
        Finding("pseudonodule", ("basal",)),
        Finding("ground glass pattern", ("basal",)),
    ]


def test_rnn_flat_list_locations_qualify_the_preceding_run_and_spaces_are_stripped(padchest):
    ex = _only(padchest, **padchest.RNN)
    assert ex.findings == [
        Finding("cardiomegaly", ("hilar", "cardiac", "left")),
        Finding("vascular hilar enlargement", ("hilar", "cardiac", "left")),
        Finding("costophrenic angle blunting", ("costophrenic angle",)),
        Finding("pleural effusion", ("costophrenic angle",)),
        Finding("heart insufficiency"),
    ]


def test_labelcuis_newlines_do_not_split_rows(padchest):
    rows = [padchest.row(i, **padchest.PHYSICIAN) for i in range(3)]
    result = _read(padchest, rows)
    assert result.rows_total == 3 and len(result.examples) == 3


def test_normal_alone_is_a_normal_study(padchest):
    assert _only(padchest, **padchest.NORMAL).findings == []


def test_normal_next_to_findings_is_dropped(padchest):
    ex = _only(padchest, Labels="['pacemaker', 'normal']", LabelsLocalizationsBySentence="['pacemaker', 'normal']")
    assert ex.findings == [Finding("pacemaker")]


def test_names_are_lower_cased(padchest):
    ex = _only(
        padchest, Labels="['COPD signs', 'NSG tube']", LabelsLocalizationsBySentence="[['COPD signs'], ['NSG tube']]"
    )
    assert [f.name for f in ex.findings] == ["copd signs", "nsg tube"]


def test_literal_nan_labels_are_skipped(padchest):
    assert _skip_reason(padchest, Labels="nan", Localizations="nan", LabelsLocalizationsBySentence="nan") == (
        "missing_labels"
    )


def test_only_empty_string_label_is_skipped(padchest):
    assert _skip_reason(padchest, Labels="['']", Localizations="[]", LabelsLocalizationsBySentence="['']") == (
        "empty_labels"
    )


def test_empty_string_next_to_real_labels_is_dropped(padchest):
    ex = _only(
        padchest,
        Labels="['', 'granuloma']",
        LabelsLocalizationsBySentence="['', 'granuloma', 'loc left']",
    )
    assert ex.findings == [Finding("granuloma", ("left",))]


def test_only_unchanged_is_skipped(padchest):
    assert _skip_reason(padchest, Labels="['unchanged']", LabelsLocalizationsBySentence="[['unchanged']]") == (
        "only_unchanged"
    )


def test_unchanged_next_to_findings_is_dropped(padchest):
    ex = _only(
        padchest,
        Labels="['cardiomegaly', '', 'unchanged']",
        LabelsLocalizationsBySentence="['cardiomegaly', 'loc cardiac', 'unchanged']",
    )
    assert ex.findings == [Finding("cardiomegaly", ("cardiac",))]


@pytest.mark.parametrize("label", ["exclude", "suboptimal study", " suboptimal study"])
def test_drop_labels_skip_the_row(padchest, label):
    labels = f"['cardiomegaly', '{label}']"
    assert _skip_reason(padchest, Labels=labels, LabelsLocalizationsBySentence=labels) == "dropped_label"


def test_empty_drop_labels_keeps_exclude_as_a_finding(padchest):
    result = _read(padchest, [padchest.row(0, Labels="['exclude']")], drop_labels=[])
    assert result.examples[0].findings == [Finding("exclude")]


@pytest.mark.parametrize("cell", ["['cardiomegaly'", "__import__('os').system('false')", "['a', 3]", "{'a': 1}"])
def test_unparsable_labels_are_skipped_and_never_evaluated(padchest, cell):
    assert _skip_reason(padchest, Labels=cell) == "unparsable_labels"


def test_bare_nan_inside_sentence_list_is_tolerated(padchest):
    # Real row: a sentence list whose first element is a bare nan (not a string).
    ex = _only(
        padchest,
        Labels="['unchanged', 'vascular hilar enlargement']",
        LabelsLocalizationsBySentence="[nan, ['unchanged'], [], ['vascular hilar enlargement', 'loc hilar', "
        "'loc cardiac', 'loc mediastinum'], ['normal'], ['normal', 'loc costophrenic angle']]",
    )
    assert ex.findings == [Finding("vascular hilar enlargement", ("hilar", "cardiac", "mediastinum"))]


def test_unparsable_sentences_keep_the_labels_without_locations(padchest):
    result = _read(padchest, [padchest.row(0, Labels="['nodule']", LabelsLocalizationsBySentence="[['nodule'")])
    assert result.examples[0].findings == [Finding("nodule")]
    assert result.notes["rows_without_locations"] == 1


def test_supraspinous_typo_is_fixed(padchest):
    ex = _only(
        padchest,
        Labels="['nodule']",
        LabelsLocalizationsBySentence="[['nodule', 'loc supraspisnous']]",
    )
    assert ex.findings == [Finding("nodule", ("supraspinous",))]


def test_more_specific_sentence_items_map_to_their_label(padchest):
    ex = _only(
        padchest,
        Labels="['pleural effusion', 'hemidiaphragm elevation']",
        LabelsLocalizationsBySentence="[['pleural effusion left side', 'loc pleural', 'loc left'], "
        "['hemidiaphragm elevation right side', 'loc diaphragm', 'loc right']]",
    )
    assert ex.findings == [
        Finding("pleural effusion", ("pleural", "left")),
        Finding("hemidiaphragm elevation", ("diaphragm", "right")),
    ]


def test_normal_sentences_in_an_abnormal_study_do_not_leak_locations(padchest):
    ex = _only(
        padchest,
        Labels="['chronic changes']",
        LabelsLocalizationsBySentence="[['chronic changes'], ['normal', 'loc cardiac', 'loc mediastinum']]",
    )
    assert ex.findings == [Finding("chronic changes")]


def test_none_in_dicom_columns_is_harmless(padchest):
    ex = _only(padchest, Rows_DICOM="None", WindowCenter_DICOM="None", PatientBirth="None")
    assert ex.findings == []


# --- filters ------------------------------------------------------------------------------------


def test_projection_filter(padchest):
    assert _skip_reason(padchest, Projection="L") == "filtered_projection"
    result = _read(padchest, [padchest.row(0, Projection="L")], projections=["L"])
    assert len(result.examples) == 1


def test_method_filter(padchest):
    rows = [padchest.row(0, **padchest.PHYSICIAN), padchest.row(1, **padchest.RNN)]
    result = _read(padchest, rows, method_labels=["Physician"])
    assert [e.source_row for e in result.examples] == [1]
    assert result.skipped == {"filtered_method": 1}


def test_pediatric_filter(padchest):
    rows = [padchest.row(0, Pediatric="PED"), padchest.row(1)]
    assert len(_read(padchest, rows).examples) == 2
    result = _read(padchest, rows, include_pediatric=False)
    assert len(result.examples) == 1 and result.skipped == {"pediatric": 1}


# --- images and layout --------------------------------------------------------------------------


def test_nested_layout_is_detected_and_paths_point_at_files(padchest):
    result = _read(padchest, [padchest.row(i) for i in range(4)])
    assert result.notes["image_layout"] == "nested"
    assert "4 nested / 0 flat" in result.notes["image_layout_detection"]
    assert all(e.image_path.is_file() and e.image_path.parent.name in "012" for e in result.examples)


def test_flat_layout_is_detected(padchest):
    result = _read(padchest, [padchest.row(i) for i in range(4)], layout="flat")
    assert result.notes["image_layout"] == "flat"
    assert len(result.examples) == 4
    assert all(e.image_path.parent == padchest.image_root.resolve() for e in result.examples)


def test_explicit_layout_overrides_detection(padchest):
    result = _read(padchest, [padchest.row(i) for i in range(2)], layout="flat", image_layout="nested")
    assert result.skipped == {"missing_image": 2}


def test_missing_image_is_skipped(padchest):
    rows = [padchest.row(0), padchest.row(1)]
    cfg = padchest.build(rows)
    next(padchest.image_root.rglob(rows[1]["ImageID"])).unlink()
    result = reader.read(cfg)
    assert [e.image_id for e in result.examples] == [rows[0]["ImageID"]]
    assert result.skipped == {"missing_image": 1}


def test_require_images_false_keeps_rows_without_files(padchest):
    cfg = padchest.build([padchest.row(i) for i in range(3)], images=False)
    assert reader.read(cfg).skipped == {"missing_image": 3}
    result = reader.read(cfg, require_images=False)
    assert len(result.examples) == 3 and result.notes["images_checked"] is False


@pytest.mark.parametrize("image_id", ["../../../etc/passwd", "/etc/passwd"])
def test_path_escape_is_skipped(padchest, image_id):
    result = _read(padchest, [padchest.row(0, ImageID=image_id, ImageDir="0")], image_layout="flat")
    assert result.skipped == {"path_escape": 1}


def test_missing_image_id_is_skipped(padchest):
    assert _skip_reason(padchest, ImageID=" ") == "missing_image_id"


def test_group_id_is_the_patient_and_falls_back_to_the_study(padchest):
    rows = [padchest.row(0, PatientID="p1"), padchest.row(1, PatientID="p1"), padchest.row(2, PatientID="")]
    result = _read(padchest, rows)
    assert [e.group_id for e in result.examples] == ["p1", "p1", "study:study2"]


# --- files and errors ---------------------------------------------------------------------------


def test_gz_and_plain_csv_read_the_same(padchest):
    rows = [padchest.row(0, **padchest.PHYSICIAN), padchest.row(1, **padchest.RNN), padchest.row(2, Labels="nan")]
    plain = _read(padchest, rows)
    gz = _read(padchest, rows, name="padchest.csv.gz")
    assert [e.findings for e in gz.examples] == [e.findings for e in plain.examples]
    assert gz.skipped == plain.skipped == {"missing_labels": 1}


def test_via_registry(padchest):
    result = read_dataset(padchest.build([padchest.row(0)]))
    assert len(result.examples) == 1


def test_missing_csv_names_the_file(tmp_path):
    cfg = data_config(dataset="padchest", csv=tmp_path / "nope.csv", image_root=tmp_path)
    with pytest.raises(DataError, match="nope.csv"):
        reader.read(cfg)


def test_missing_column_names_column_and_file(padchest, tmp_path):
    columns = [c for c in padchest.COLUMNS if c != "Labels"]
    path = padchest.write_csv(tmp_path / "cut.csv", [padchest.row(0)], columns=columns)
    cfg = data_config(dataset="padchest", csv=path, image_root=tmp_path)
    with pytest.raises(DataError, match=r"cut\.csv.*'Labels'"):
        reader.read(cfg)


def test_corrupt_gz_is_a_data_error(tmp_path):
    path = tmp_path / "bad.csv.gz"
    path.write_bytes(gzip.compress(b'"",ImageID\n0,a.png\n')[:15])
    cfg = data_config(dataset="padchest", csv=path, image_root=tmp_path)
    with pytest.raises(DataError, match="bad.csv.gz"):
        reader.read(cfg)


def test_strict_raises_naming_file_and_row(padchest):
    rows = [padchest.row(0), padchest.row(1, Labels="nan")]
    cfg = padchest.build(rows, strict=True)
    with pytest.raises(DataError, match=r"padchest\.csv row 2: missing_labels"):
        reader.read(cfg)


def test_every_row_is_accounted_for(padchest):
    rows = [
        padchest.row(0, **padchest.PHYSICIAN),
        padchest.row(1, **padchest.RNN),
        padchest.row(2, Labels="nan"),
        padchest.row(3, Labels="['']"),
        padchest.row(4, Labels="['unchanged']"),
        padchest.row(5, Labels="['exclude']"),
        padchest.row(6, Projection="COSTAL"),
        padchest.row(7, Labels="[broken"),
    ]
    result = _read(padchest, rows)
    assert result.rows_total == 8 and len(result.examples) == 2
    assert result.skipped == {
        "missing_labels": 1,
        "empty_labels": 1,
        "only_unchanged": 1,
        "dropped_label": 1,
        "filtered_projection": 1,
        "unparsable_labels": 1,
    }



def test_unusual_but_safe_image_ids_are_found(padchest):
    ex = _only(padchest, ImageID="scan (1) ñ.png")
    assert ex.image_path.is_file()


def test_symlinked_image_folders_are_followed(padchest, tmp_path):
    # Users spread the 1 TB of images over disks and symlink the folders into one root.
    cfg = padchest.build([padchest.row(0, ImageDir="0")])
    elsewhere = tmp_path / "other_disk"
    (padchest.image_root / "0").rename(elsewhere)
    (padchest.image_root / "0").symlink_to(elsewhere, target_is_directory=True)
    result = reader.read(cfg)
    assert len(result.examples) == 1 and result.examples[0].image_path.is_file()


def test_empty_csv_file_is_a_data_error(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty.csv"):
        reader.read(data_config(dataset="padchest", csv=path, image_root=tmp_path))
