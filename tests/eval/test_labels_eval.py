"""Labels files through `sparkct finetune` / `experiment` (load_task): conflicting rows, NaN, 1 beside 1.0."""

from __future__ import annotations

import csv

import pytest

from sparkct.errors import UserError
from sparkct.eval.data import load_task


def test_labels_files_are_checked_row_by_row(eval_cache, tmp_path, write_csv):
    cache = eval_cache["cache"]
    series = list(csv.DictReader(open(eval_cache["series_labels"])))
    patients = list(csv.DictReader(open(eval_cache["patient_labels"])))
    p0, k0 = patients[0]["patient"], series[0]["series_key"]
    cases = {
        # a patient given two labels: named as the patient, with the lines of both rows
        rf"patient {p0} is labelled '\w+' \(line 2\) and '\w+' \(line {len(patients) + 2}\)": (
            ["patient", "label"],
            [[r["patient"], r["label"]] for r in patients]
            + [[p0, "clear" if patients[0]["label"] == "nodule" else "nodule"]],
        ),
        rf"series_key {k0} is labelled": (
            ["series_key", "label"],
            [[r["series_key"], r["label"]] for r in series] + [[k0, 1 - int(series[0]["label"])]],
        ),
        r"empty label \(or NaN\) on line\(s\) \[3\]": (
            ["series_key", "label"],
            [[r["series_key"], "nan" if i == 1 else r["label"]] for i, r in enumerate(series)],
        ),
        "at least two classes": (
            ["series_key", "label"],
            [[r["series_key"], "1" if i % 2 else "1.0"] for i, r in enumerate(series)],
        ),
    }
    for msg, (header, body) in cases.items():
        path = write_csv(tmp_path / "bad.csv", header, body)
        with pytest.raises(UserError, match=msg) as e:
            load_task(cache, path)
        assert "\n" not in str(e.value)


def test_1_and_1_0_are_one_class(eval_cache, tmp_path, write_csv):
    series = list(csv.DictReader(open(eval_cache["series_labels"])))
    body = [[r["series_key"], f"{r['label']}.0" if i % 2 else r["label"]] for i, r in enumerate(series)]
    task = load_task(eval_cache["cache"], write_csv(tmp_path / "l.csv", ["series_key", "label"], body))
    assert task.classes == [0, 1]
