"""sparkct.eval.metrics: equality with scikit-learn, bootstrap coverage, paired tests, DeLong vs pROC."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn import metrics as skm

from sparkct.errors import UserError
from sparkct.eval import metrics as M

# The aSAH data set (Turck et al. 2010, Intensive Care Med 36:107-115; 113 patients with aneurysmal
# subarachnoid haemorrhage), as shipped with the R package pROC (data/aSAH.RData), in row order:
# outcome (1 = Poor), WFNS grade, S100B and NDKA levels.
ASAH_POOR = (
    "00001101001011001011101000000000100110110000000001100010001010011101101111000110100000010000000000001111110001000"
)
ASAH_WFNS = (
    "11113254125255125225211112121134214541425511241125521251222151125214524414121421232421451154221113125225552445111"
)
ASAH_S100B = """
0.13 0.14 0.1 0.04 0.13 0.1 0.47 0.16 0.18 0.1 0.12 0.1 0.44 0.71 0.04 0.08 0.49 0.04 0.07 0.33 0.09
0.09 0.07 0.11 0.07 0.17 0.07 0.11 0.13 0.19 0.05 0.16 0.41 0.14 0.34 0.35 0.48 0.09 0.96 0.25 0.5
0.46 0.16 0.07 0.43 0.45 0.11 0.08 0.09 0.86 0.52 0.08 0.06 0.13 2.07 0.1 0.14 0.15 0.07 0.06 0.77
0.05 0.09 0.3 0.03 0.09 0.04 0.23 0.7 0.09 0.27 0.71 0.08 0.26 0.08 0.16 0.09 0.13 0.1 0.08 0.11
0.33 0.11 0.28 0.07 0.1 0.32 0.22 0.07 0.05 0.24 0.38 0.1 0.15 0.08 0.14 0.1 0.07 0.04 0.19 0.56
0.14 0.58 0.32 0.82 0.74 0.15 0.47 0.17 0.44 0.15 0.5 0.48
"""
ASAH_NDKA = """
3.01 8.54 8.09 10.42 17.4 12.75 6 13.2 15.54 6.01 15.96 17.86 5.18 8.9 13.41 20.75 11.6 16.11 32.37
54.82 32.41 49.94 40.34 9.47 6.29 12.53 6.54 6.3 80.3 12.8 9.8 9.81 9.85 18.21 5.03 14.04 21.93 8.02
7.42 8.38 6.59 9.63 13.12 7.96 14.34 41.43 7.63 7.06 12.59 13.56 3.87 9.44 7.66 12.98 419.19 27.19
22.27 9.95 21.22 11.73 10.4 58.83 6.39 11.09 12.22 13.67 17.21 22.63 12.9 9.7 21.57 8.23 72.57 15.54
10.51 10.6 14.57 5.19 9.63 4.61 21.48 17.3 12.71 9.44 11.07 19.46 10.83 5.37 11.97 7.75 9.83 10.55
28.49 8.53 12.57 12.9 46.83 11.68 12.67 9.01 9.57 34.06 11.72 14.26 47.61 11.67 24.58 10.33 13.87
15.89 22.43 6.79 13.45
"""

# DeLong's test for two correlated ROC curves on aSAH, as published by pROC's own test suite
# (xrobin/pROC tests/testthat/test-roc.test.R "roc.test statistic and p are as expected with
# defaults", test-var.R, test-cov.R): roc.test(r.wfns, r.s100b) etc. with defaults (DeLong, paired,
# two-sided, 95 %).
PROC_ROC_TEST = {  # (a, b): (Z, p, conf.int low, conf.int high)
    ("wfns", "s100b"): (2.20898359144091, 0.0271757822291882, 0.0104061769564846, 0.174214419249478),
    ("wfns", "ndka"): (2.79777591868904, 0.00514557970691098, 0.0634011709339876, 0.3600405634833566),
    ("ndka", "s100b"): (-1.39077002573558, 0.164295175223054, -0.2876917446341914, 0.0488706064228094),
}
PROC_VAR = {"wfns": 0.00146991470882363, "ndka": 0.0031908105493913, "s100b": 0.00266868245717244}
PROC_COV = {
    ("wfns", "ndka"): -0.000532967856762438,
    ("ndka", "s100b"): -0.000756164938056579,
    ("s100b", "wfns"): 0.00119615567376754,
}
PROC_AUC = {"wfns": 0.823678861788618, "ndka": 0.611957994579946, "s100b": 0.731368563685637}


def asah():
    y = np.array([int(c) for c in ASAH_POOR])
    x = {
        "wfns": np.array([int(c) for c in ASAH_WFNS], float),
        "s100b": np.array(ASAH_S100B.split(), float),
        "ndka": np.array(ASAH_NDKA.split(), float),
    }
    assert len(y) == 113 and all(len(v) == 113 for v in x.values()) and y.sum() == 41
    return y, x


def test_delong_matches_proc_published_values():
    y, x = asah()
    for name, auc in PROC_AUC.items():
        a, v = M.delong_variance(y, x[name])
        assert a == pytest.approx(auc, abs=1e-12)
        assert v == pytest.approx(PROC_VAR[name], rel=1e-9)
    for (a, b), (z, p, lo, hi) in PROC_ROC_TEST.items():
        r = M.delong_test(y, x[a], x[b])
        assert r["z"] == pytest.approx(z, rel=1e-9)
        assert r["p"] == pytest.approx(p, rel=1e-9)
        assert (r["low"], r["high"]) == pytest.approx((lo, hi), rel=1e-9)
        r2 = M.delong_test(y, x[b], x[a])  # reversed: same p, opposite Z
        assert r2["p"] == pytest.approx(p, rel=1e-9) and r2["z"] == pytest.approx(-z, rel=1e-9)
    for (a, b), c in PROC_COV.items():
        assert M.delong_test(y, x[a], x[b])["cov"] == pytest.approx(c, rel=1e-9)


def test_delong_identical_and_clearly_better():
    y, x = asah()
    r = M.delong_test(y, x["wfns"], x["wfns"])
    assert r["z"] == 0 and r["p"] == 1.0 and r["diff"] == 0
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(200, int), np.ones(200, int)]
    good = np.r_[rng.normal(0, 1, 200), rng.normal(2.5, 1, 200)]
    weak = np.r_[rng.normal(0, 1, 200), rng.normal(0.3, 1, 200)]
    r = M.delong_test(y, good, weak)
    assert r["diff"] > 0.3 and r["p"] < 1e-12 and r["low"] > 0


def test_delong_multiclass_variance_close_to_bootstrap():
    # K = 3: the macro one-vs-rest AUC's variance from stratified placements ~ the bootstrap's.
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 80)
    logits = rng.normal(size=(240, 3)) + 1.2 * np.eye(3)[y]
    auc, var = M.delong_variance(y, logits, scores="logits")
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert auc == pytest.approx(skm.roc_auc_score(y, prob, multi_class="ovr"), abs=1e-12)
    assert M.compute_metrics(y, logits, scores="logits") == pytest.approx(M.compute_metrics(y, prob), abs=1e-12)
    ci = M.bootstrap_ci(y, logits, n_resamples=2000, method="percentile", seed=0, scores="logits")["auc"]
    assert np.sqrt(var) == pytest.approx(ci["se"], rel=0.15)


def _random_case(k, n, rng, ties=False):
    y = np.r_[np.arange(k), rng.integers(0, k, n - k)]
    logits = rng.normal(size=(n, k)) + np.eye(k)[y]
    if ties:
        logits = np.round(logits, 1)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


@pytest.mark.parametrize("k", [2, 3, 5])
def test_metrics_equal_sklearn(k):
    rng = np.random.default_rng(k)
    y, p = _random_case(k, 300, rng)
    got = M.compute_metrics(y, p if k > 2 else p[:, 1])
    pred = p.argmax(1)
    avg = "binary" if k == 2 else "macro"
    exp = {
        "auc": skm.roc_auc_score(y, p[:, 1]) if k == 2 else skm.roc_auc_score(y, p, multi_class="ovr"),
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "f1": skm.f1_score(y, pred, average=avg),
        "precision": skm.precision_score(y, pred, average=avg),
        "recall": skm.recall_score(y, pred, average=avg),
    }
    assert got == pytest.approx(exp, abs=1e-12)
    assert set(got) == set(M.METRICS)


@pytest.mark.parametrize("k,ties", [(2, False), (2, True), (4, True)])
def test_batched_metrics_equal_sklearn_on_resamples(k, ties):
    # The bootstrap's batched form (counts of each item) equals scikit-learn on the repeated items.
    rng = np.random.default_rng(10 + k)
    y, p = _random_case(k, 60, rng, ties=ties)
    counts = rng.multinomial(60, np.full(60, 1 / 60), size=5)
    counts[:, :k] += 1  # every class present
    batched = M.metrics_from_counts(y, p, counts)
    for r in range(len(counts)):
        idx = np.repeat(np.arange(60), counts[r])
        exp = M.compute_metrics(y[idx], p[idx])
        assert {m: batched[m][r] for m in M.METRICS} == pytest.approx(exp, abs=1e-12)


def test_bootstrap_ci_coverage_known_auc():
    # Scores N(0, 1) for negatives and N(d, 1) for positives: AUC = Phi(d / sqrt 2). About 95 % of
    # the intervals from repeated test sets must hold it.
    d, n, reps = 1.2, 40, 200
    true = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(7)
    y = np.r_[np.zeros(n, int), np.ones(n, int)]
    hits = 0
    for r in range(reps):
        s = np.r_[rng.normal(0, 1, n), rng.normal(d, 1, n)]
        ci = M.bootstrap_ci(y, s, seed=r, metrics=["auc"])["auc"]
        assert ci["low"] <= ci["value"] <= ci["high"]
        hits += ci["low"] <= true <= ci["high"]
    assert 0.90 <= hits / reps <= 0.99


def test_bootstrap_is_stratified_and_deterministic():
    rng = np.random.default_rng(1)
    y, p = _random_case(2, 50, rng)
    a = M.bootstrap_ci(y, p, n_resamples=200, seed=5)
    b = M.bootstrap_ci(y, p, n_resamples=200, seed=5)
    assert a == b
    # a degenerate metric (precision 1 in every resample) falls back to a finite interval
    s = np.r_[np.full(20, 0.1), np.full(5, 0.9), np.full(15, 0.2)]
    yy = np.r_[np.zeros(20, int), np.ones(20, int)]
    ci = M.bootstrap_ci(yy, s, n_resamples=200)
    assert ci["precision"] == {"value": 1.0, "low": 1.0, "high": 1.0, "se": 0.0}


def test_group_bootstrap_equals_item_bootstrap_of_deduplicated_groups():
    # Each patient contributes 4 identical slices: resampling patients must give exactly the
    # intervals of resampling the 1-slice-per-patient set (the slice-level bootstrap is too narrow).
    rng = np.random.default_rng(2)
    y, p = _random_case(2, 40, rng)
    yr, pr, g = np.repeat(y, 4), np.repeat(p, 4, axis=0), np.repeat(np.arange(40), 4)
    grouped = M.bootstrap_ci(yr, pr, groups=g, n_resamples=300, seed=1)
    single = M.bootstrap_ci(y, p, n_resamples=300, seed=1)
    for m in M.METRICS:
        assert grouped[m] == pytest.approx(single[m], abs=1e-12)
    naive = M.bootstrap_ci(yr, pr, n_resamples=300, seed=1)
    assert naive["auc"]["high"] - naive["auc"]["low"] < 0.7 * (single["auc"]["high"] - single["auc"]["low"])


def test_paired_bootstrap_known_answers():
    y, x = asah()
    same = M.paired_bootstrap(y, x["s100b"] / x["s100b"].max(), x["s100b"] / x["s100b"].max(), n_resamples=500)
    for m in M.METRICS:
        assert same[m]["diff"] == 0 and same[m]["p"] == 1.0 and same[m]["low"] == same[m]["high"] == 0
    rng = np.random.default_rng(4)
    yy = np.r_[np.zeros(150, int), np.ones(150, int)]
    good = np.r_[rng.normal(0, 1, 150), rng.normal(3, 1, 150)]
    noise = rng.normal(size=300)
    r = M.paired_bootstrap(yy, norm.cdf(good - 1.5), norm.cdf(noise), n_resamples=500)
    assert r["auc"]["diff"] > 0.4 and r["auc"]["low"] > 0.3
    assert r["auc"]["p"] == pytest.approx(2 / 501)
    # agrees with DeLong on aSAH (wfns vs s100b: p = 0.027)
    b = M.paired_bootstrap(y, x["wfns"], x["s100b"], n_resamples=2000, metrics=["auc"])["auc"]
    assert 0.005 < b["p"] < 0.1 and b["low"] > 0


def test_user_errors():
    with pytest.raises(UserError, match="no items of class"):
        M.compute_metrics([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(UserError, match="labels for"):
        M.compute_metrics([0, 1], [0.2, 0.5, 0.9])
    with pytest.raises(UserError, match="NaN"):
        M.bootstrap_ci([0, 1, 0, 1], [0.2, np.nan, 0.1, 0.3])
    with pytest.raises(UserError, match="at least 2"):
        M.bootstrap_ci([0, 1, 0], [0.2, 0.5, 0.1])
    with pytest.raises(UserError, match="CI method"):
        M.bootstrap_ci([0, 1, 0, 1], [0.2, 0.5, 0.1, 0.7], method="normal")
    with pytest.raises(UserError, match="unknown metric"):
        M.bootstrap_ci([0, 1, 0, 1], [0.2, 0.5, 0.1, 0.7], metrics=["auroc"])
    with pytest.raises(UserError, match="columns"):
        M.delong_test([0, 1, 2], np.eye(3), np.eye(3)[:, :2])


def test_scores_that_are_not_probabilities_are_refused_or_taken_as_logits():
    # Logits taken for probabilities were cut at 0.5: accuracy 0.75 instead of 1.0 (issue 19, 5a).
    y, z = [0, 0, 1, 1], [-3, -1, 0.3, 2]
    with pytest.raises(UserError, match="probabilities in \\[0, 1\\].*scores='logits'"):
        M.compute_metrics(y, z)
    with pytest.raises(UserError, match="scores='logits'"):
        M.bootstrap_ci(y, z, n_resamples=10)
    with pytest.raises(UserError, match="scores='logits'"):
        M.paired_bootstrap(y, z, z, n_resamples=10)
    with pytest.raises(UserError, match="scores='logits'"):
        M.metrics_from_counts(y, z, np.ones((1, 4)))
    got = M.compute_metrics(y, z, scores="logits")
    assert got["accuracy"] == 1.0 and got["f1"] == 1.0 and got["auc"] == 1.0
    # (n, K) rows: logits or unnormalized scores are refused, softmax with scores='logits'
    rows = np.array([[2.0, -1.0], [0.5, 0.1], [-1.0, 1.5], [0.2, 0.9]])
    with pytest.raises(UserError, match="probabilities in"):
        M.compute_metrics(y, rows)
    with pytest.raises(UserError, match="row 0 sums to 0.9"):
        M.compute_metrics([0, 1, 2], np.array([[0.5, 0.3, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]))
    soft = np.exp(rows) / np.exp(rows).sum(1, keepdims=True)
    assert M.compute_metrics(y, rows, scores="logits") == pytest.approx(M.compute_metrics(y, soft), abs=1e-12)
    assert M.compute_metrics(y, soft.astype(np.float32)) == pytest.approx(M.compute_metrics(y, soft), abs=1e-6)
    with pytest.raises(UserError, match="'probabilities' or 'logits'"):
        M.compute_metrics(y, soft, scores="margins")
    # AUC alone ranks the scores: any binary scale is taken as it is, no threshold involved
    assert M.compute_metrics(y, z, metrics=["auc"]) == {"auc": 1.0}
    assert M.delong_variance(y, z)[0] == 1.0


def test_summarize_over_seeds():
    s = M.summarize([0.8, 0.82, 0.84])
    assert s["mean"] == pytest.approx(0.82) and s["low"] < 0.8 and s["high"] > 0.84 and s["n"] == 3
    assert M.summarize([0.7])["n"] == 1 and np.isnan(M.summarize([0.7])["low"])


def test_several_seeds_average_the_metric():
    y, x = asah()
    two = M.Models([x["wfns"], x["s100b"]])
    ci = M.bootstrap_ci(y, two, n_resamples=300, metrics=["auc"])["auc"]
    assert ci["value"] == pytest.approx((PROC_AUC["wfns"] + PROC_AUC["s100b"]) / 2)
    assert ci["low"] < ci["value"] < ci["high"]
    # the mean of two seeds' AUCs compared with ndka: DeLong on the averaged influence values
    d = M.delong_test(y, two, x["ndka"])
    assert d["diff"] == pytest.approx((PROC_AUC["wfns"] + PROC_AUC["s100b"]) / 2 - PROC_AUC["ndka"])
    # var of (A + B) / 2 = (var A + var B + 2 cov) / 4, from pROC's published values
    want = (PROC_VAR["wfns"] + PROC_VAR["s100b"] + 2 * PROC_COV[("s100b", "wfns")]) / 4
    assert d["var_a"] == pytest.approx(want, rel=1e-9)
    same = M.paired_bootstrap(y, two, M.Models([x["s100b"], x["wfns"]]), n_resamples=200, metrics=["auc"])
    assert same["auc"]["diff"] == 0 and same["auc"]["p"] == 1.0


def test_simulated_intervals_are_those_of_bootstrap_ci():
    # interval_coverage evaluates many simulated test sets at once; each interval must be exactly the
    # one bootstrap_ci gives that test set (same patient resampling, same BCa), or it measures
    # another method.
    rng = np.random.default_rng(8)
    group = np.repeat(np.arange(10), 5)
    y = np.zeros(50, int)
    y[[0, 1, 5, 6, 7, 10, 15, 16]] = 1  # patients 0-3 have positive slices
    order = np.argsort(-y, kind="stable")
    y, group = y[order], group[order]
    s = rng.normal(size=(3, 50)) + 0.8 * y
    s[2, :4] = s[2, -4:]  # ties
    unit, _, strata = M._units(y, group)
    n_pos = int(y.sum())
    low, high, dist = M._run_bootstrap(
        M._pairwise_auc(s[:, :n_pos], s[:, n_pos:]),
        unit,
        strata,
        n_resamples=300,
        confidence=0.95,
        method="BCa",
        seed=5,
        batch=120,
    )
    for k in range(3):
        ci = M.bootstrap_ci(y, s[k], groups=group, n_resamples=300, seed=5, batch=120, metrics=["auc"])["auc"]
        assert (low[k], high[k]) == pytest.approx((ci["low"], ci["high"]), abs=1e-12)
        assert dist[k].std(ddof=1) == pytest.approx(ci["se"], abs=1e-12)


def test_patient_bootstrap_bca_coverage_at_a_small_test_set():
    # The experiment's interval (patient bootstrap, BCa) at 18 test patients of 17 slices: its
    # coverage falls short of 95 % (issue 19 measured 90.7 % with 300 simulations; the stored table,
    # 1,000 simulations, gives COVERAGE[18]). 200 simulations: the band is about 3 standard errors.
    r = M.interval_coverage(18, n_sims=200, n_resamples=200, seed=0)
    assert r["n_sims"] == 200 and r["true_auc"] == 0.7
    assert 0.88 <= r["coverage"] <= 0.975
    assert abs(r["coverage"] - M.COVERAGE[18]) < 3.5 * r["se"]
    assert 0.15 < r["mean_width"] < 0.35
    with pytest.raises(UserError, match="n_patients"):
        M.interval_coverage(3)
