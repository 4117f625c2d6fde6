"""Embedding bias probes: a probe finds what hand-made embeddings encode (CI above chance) and reports
near chance on noise; absent, single-valued and untestable targets are skipped with a reason; the
patient split holds; mistakes are one-line errors; `sparkct eval probe` writes probe.md / probe.json."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sparkct.cli import main
from sparkct.errors import UserError
from sparkct.eval.probe import AGE_BANDS, metadata_values, parse_targets, probe_target


def _patients(n_patients=60, per=4, seed=0):
    rng = np.random.default_rng(seed)
    sex = np.where(rng.random(n_patients) < 0.5, "F", "M")
    pat = np.repeat(np.arange(n_patients), per)
    perm = rng.permutation(n_patients)
    train_p, test_p = perm[: n_patients // 2], perm[n_patients // 2 :]
    train, test = np.nonzero(np.isin(pat, train_p))[0], np.nonzero(np.isin(pat, test_p))[0]
    return rng, sex[pat], pat, train, test


def test_a_target_the_embeddings_encode_is_found_above_chance():
    rng, sex, pat, train, test = _patients()
    feats = rng.normal(size=(len(sex), 16))
    feats[:, 3] += 1.5 * (sex == "M")  # one direction of the embedding carries sex
    r = probe_target(feats, sex, pat, train, test, n_resamples=300)
    assert r["status"] == "done" and r["classes"] == ["F", "M"]
    assert r["above_chance"] and r["metrics"]["auc"]["low"] > 0.75
    assert r["metrics"]["balanced_accuracy"]["low"] > r["chance"]["balanced_accuracy"] == 0.5
    assert r["n_train"]["patients"] + r["n_test"]["patients"] == 60


def test_noise_embeddings_stay_near_chance():
    rng, sex, pat, train, test = _patients(seed=1)
    feats = rng.normal(size=(len(sex), 16))
    r = probe_target(feats, sex, pat, train, test, n_resamples=300)
    auc = r["metrics"]["auc"]
    assert not r["above_chance"] and auc["low"] < 0.5 < auc["high"] and abs(auc["value"] - 0.5) < 0.15
    # majority-class accuracy: the training set's most common class, scored on the test slices
    maj = r["chance"]["majority_class"]
    assert r["chance"]["accuracy"] == pytest.approx(np.mean(sex[test] == maj))


def test_multiclass_chance_is_one_over_k_and_short_classes_are_left_out():
    rng, _, pat, train, test = _patients(n_patients=60, seed=2)
    cls = np.array(["100", "120", "140"])[pat % 3]
    cls = np.where(pat == pat[test[0]], "80", cls)  # one test patient alone in class "80"
    feats = rng.normal(size=(len(pat), 8))
    feats[:, 0] += (pat % 3) * 2.0
    r = probe_target(feats, cls, pat, train, test, n_resamples=200)
    assert r["status"] == "done" and r["classes"] == ["100", "120", "140"]
    assert r["chance"]["balanced_accuracy"] == pytest.approx(1 / 3) and r["above_chance"]
    assert "80" in r["dropped_classes"]


def test_absent_single_valued_and_untestable_targets_are_skipped_with_a_reason():
    rng, sex, pat, train, test = _patients()
    feats = rng.normal(size=(len(sex), 4))
    r = probe_target(feats, np.full(len(sex), ""), pat, train, test)
    assert r["status"] == "skipped" and "no values" in r["reason"]
    r = probe_target(feats, np.full(len(sex), "sparkct synth"), pat, train, test)
    assert r["status"] == "skipped" and "single value ('sparkct synth')" in r["reason"]
    v = sex.copy()
    v[test[:4]] = "F"  # a single test patient (4 slices) of class F: no interval for it
    v[test[4:]] = "M"
    r = probe_target(feats, v, pat, train, test)
    assert r["status"] == "skipped" and "F: " in r["reason"] and "1 test patients" in r["reason"]


def test_age_bands_and_metadata_values_from_the_cache(tmp_path):
    assert [b[2] for b in AGE_BANDS] == ["<40", "40-59", "60-79", ">=80"]

    class Cache:  # the two tables metadata_values reads
        slice_series = np.array([0, 0, 1, 2, 3])
        series = {
            "age_years": np.array([39.9, 40.0, 80.0, np.nan], np.float32),
            "kvp": np.array([120.0, np.nan, 100.0, 140.0], np.float32),
            "patient_sex": np.array(["F", "M", "", "F"]),
        }

        def __len__(self):
            return 5

    c = Cache()
    assert metadata_values(c, "age_band").tolist() == ["<40", "<40", "40-59", ">=80", ""]
    assert metadata_values(c, "kvp", [0, 2, 3]).tolist() == ["120", "", "100"]
    assert metadata_values(c, "sex").tolist() == ["F", "F", "M", "", "F"]
    assert metadata_values(c, "kernel").tolist() == [""] * 5  # a cache without the field: absent
    assert parse_targets("kvp, sex,kvp") == ["kvp", "sex"]
    with pytest.raises(UserError, match="unknown \\['race'\\]"):
        parse_targets("sex,race")


@pytest.fixture(scope="module")
def dicom_cache(tmp_path_factory) -> str:
    """10 synthetic DICOM patients (sex, age, kernel, kVp set per patient / series; one manufacturer)."""
    from sparkct.data import prepare
    from sparkct.data.synthetic import synth

    src = str(tmp_path_factory.mktemp("probe-synth"))
    synth(src, patients=10, seed=2, size=32, slices=2, series_per_patient=(1, 1), localizer=False)
    dst = str(tmp_path_factory.mktemp("probe-cache"))
    prepare(src, dst, progress=False, salt="ab" * 16)
    return dst


def test_cli_end_to_end(dicom_cache, tmp_path, capsys):
    out = tmp_path / "probe"
    assert (
        main(
            [
                "eval",
                "probe",
                "--init",
                "random",
                "--data",
                dicom_cache,
                "--out",
                str(out),
                "--crop",
                "32",
                "--split",
                "0.5,0.5",
                "--resamples",
                "100",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    res = json.loads((out / "probe.json").read_text())
    md = (out / "probe.md").read_text()
    t = res["targets"]
    assert set(t) == {"sex", "age_band", "manufacturer", "kernel", "kvp"}
    assert t["manufacturer"]["status"] == "skipped" and "single value" in t["manufacturer"]["reason"]
    assert "manufacturer: a single value" in md
    done = [k for k, r in t.items() if r["status"] == "done"]
    assert done, t
    for k in done:
        m = t[k]["metrics"]["auc"]
        assert 0 <= m["low"] <= m["value"] <= m["high"] <= 1 and math.isfinite(m["se"])
        assert f"| {k} |" in md
    # patients on either side of the probe, none on both
    assert res["split"]["train_patients"] + res["split"]["test_patients"] == res["patients"] == 10


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--init", "missing-backbone.pt"], "--init missing-backbone.pt: not 'random', a weights file or a run folder"),
        (["--init", "random", "--targets", "sex,race"], "--targets: unknown ['race']"),
    ],
)
def test_mistakes_are_one_line_errors(argv, msg, dicom_cache, tmp_path, capsys):
    assert main(["eval", "probe", "--data", dicom_cache, "--out", str(tmp_path / "p"), *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and err.startswith("sparkct eval probe: error:")
    assert not (tmp_path / "p").exists()


def test_data_that_is_not_a_cache_is_refused(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    assert (
        main(["eval", "probe", "--init", "random", "--data", str(tmp_path / "folder"), "--out", str(tmp_path / "p")])
        == 2
    )
    assert "not a prepared cache" in capsys.readouterr().err


def test_a_class_only_seen_beside_a_larger_one_is_left_out_not_fatal():
    # the bootstrap's stratum of a patient is its largest class: two test patients whose first slice is
    # at 80 kVp and the rest at 120 kVp leave 80 kVp without a stratum of its own
    rng, _, pat, train, test = _patients(n_patients=40, seed=3)
    v = np.array(["100", "120"])[pat % 2]
    for p in (pat[test[0]], pat[test[-1]], pat[train[0]]):
        v[np.nonzero(pat == p)[0][0]] = "80"
        v[np.nonzero(pat == p)[0][1:]] = "120"
    feats = rng.normal(size=(len(pat), 4))
    feats[:, 0] += (v == "120") * 2.0
    r = probe_target(feats, v, pat, train, test, n_resamples=100)
    assert r["status"] == "done" and r["classes"] == ["100", "120"]
    assert r["dropped_classes"]["80"]["test_patients"] == 0
