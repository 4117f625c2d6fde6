"""Labels files as users export them: duplicates, missing labels, 1 beside 1.0, a BOM, unknown columns."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from sparkct.data.datasets import CTLabelledDataset, normalize_label, read_labels_csv


def _series_rows(synth_dir):
    with open(os.path.join(synth_dir, "labels.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _write(path, header, rows, *, bom=False):
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def test_conflicting_duplicate_rows_are_refused_naming_the_key_and_both_labels(synth_dir, cache_dir, tmp_path):
    rows = _series_rows(synth_dir)
    uid = rows[0]["series_uid"]
    body = [[r["series_uid"], r["label"]] for r in rows] + [[uid, str(1 - int(rows[0]["label"]))]]
    path = _write(tmp_path / "dup.csv", ["series_uid", "label"], body)
    with pytest.raises(
        ValueError, match=rf"series_uid {uid}.*'{rows[0]['label']}'.*'{1 - int(rows[0]['label'])}'"
    ) as e:
        CTLabelledDataset(cache_dir, path, windows=None)
    assert "\n" not in str(e.value) and f"line {len(body) + 1}" in str(e.value)


def test_identical_duplicate_rows_are_accepted(synth_dir, cache_dir, tmp_path):
    rows = _series_rows(synth_dir)
    body = [[r["series_uid"], r["label"]] for r in rows]
    path = _write(tmp_path / "twice.csv", ["series_uid", "label"], body + body[:2])
    once = CTLabelledDataset(cache_dir, os.path.join(synth_dir, "labels.csv"), windows=None)
    twice = CTLabelledDataset(cache_dir, path, windows=None)
    assert np.array_equal(once.targets, twice.targets)


def test_conflicting_per_slice_rows_are_refused(synth_dir, cache_dir):
    path = os.path.join(synth_dir, "slice_labels.csv")
    rows = read_labels_csv(path)
    flipped = dict(rows[0], label=str(1 - int(rows[0]["label"])))
    with pytest.raises(ValueError, match=r"instance_number .* labelled"):
        CTLabelledDataset(cache_dir, [*rows, flipped], windows=None)


@pytest.mark.parametrize("bad", ["nan", "", "  ", "NaN"])
def test_missing_labels_are_refused_naming_the_row(synth_dir, cache_dir, tmp_path, bad):
    rows = _series_rows(synth_dir)
    body = [[r["series_uid"], r["label"]] for r in rows]
    body[1][1] = bad
    path = _write(tmp_path / "nan.csv", ["series_uid", "label"], body)
    with pytest.raises(ValueError, match=rf"line 3 \(series_uid {rows[1]['series_uid']}\): no label") as e:
        CTLabelledDataset(cache_dir, path, windows=None)
    assert "\n" not in str(e.value)


def test_integer_valued_float_labels_are_the_integer_class(synth_dir, cache_dir, tmp_path):
    rows = _series_rows(synth_dir)
    body = [[r["series_uid"], f"{int(r['label'])}.0" if i % 2 else r["label"]] for i, r in enumerate(rows)]
    path = _write(tmp_path / "floats.csv", ["series_uid", "label"], body)
    ds = CTLabelledDataset(cache_dir, path, windows=None)
    ref = CTLabelledDataset(cache_dir, os.path.join(synth_dir, "labels.csv"), windows=None)
    assert ds.classes == ref.classes == [0, 1]
    assert np.array_equal(ds.targets, ref.targets)
    assert [normalize_label(v) for v in ("1.0", " 2 ", "01", "1.5", "pos", "-0.0")] == [
        "1",
        "2",
        "1",
        "1.5",
        "pos",
        "0",
    ]


def test_a_byte_order_mark_is_read(synth_dir, cache_dir, tmp_path):
    rows = _series_rows(synth_dir)
    path = _write(
        tmp_path / "bom.csv", ["series_uid", "label"], [[r["series_uid"], r["label"]] for r in rows], bom=True
    )
    assert list(read_labels_csv(path)[0]) == ["series_uid", "label"]
    ds = CTLabelledDataset(cache_dir, path, windows=None)
    assert len(ds) > 0


def test_an_unknown_column_lists_the_columns_found(synth_dir, cache_dir, tmp_path):
    rows = _series_rows(synth_dir)
    path = _write(
        tmp_path / "cols.csv", ["series_uid", "label"], [[r["series_uid"], r["label"]] for r in rows], bom=True
    )
    with pytest.raises(ValueError) as e:
        CTLabelledDataset(cache_dir, path, label_column="nodule", windows=None)
    assert str(e.value) == "no label column 'nodule' (columns: series_uid, label)"
    path = _write(tmp_path / "noseries.csv", ["uid", "label"], [["x", "1"]])
    with pytest.raises(ValueError, match=r"series_uid \(or series_key\) column \(columns: uid, label\)"):
        CTLabelledDataset(cache_dir, path, windows=None)


def test_the_evaluation_reads_a_byte_order_mark_too(synth_dir, tmp_path):
    from sparkct.eval.data import read_labels

    rows = _series_rows(synth_dir)
    path = _write(
        tmp_path / "bom.csv", ["series_uid", "label"], [[r["series_uid"], r["label"]] for r in rows], bom=True
    )
    assert list(read_labels(path)[0]) == ["series_uid", "label"]


def test_the_hybrid_classifier_counts_1_and_1_0_as_one_class(tmp_path):
    from sparkct.train.cli import pretrain_configs

    path = _write(tmp_path / "l.csv", ["series_uid", "label"], [["a", "0"], ["b", "1"], ["c", "1.0"]], bom=True)
    _, _, mcfg = pretrain_configs("simclr", ["--labels", path, "--hybrid-weight", "0.5", "--device", "cpu"])
    assert mcfg.num_classes == 2
