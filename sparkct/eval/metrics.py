"""Classification metrics with confidence intervals, and paired comparisons of two methods.

- :func:`compute_metrics`: AUC (binary; one-vs-rest macro for multi-class), accuracy, balanced
  accuracy, F1, precision, recall, all from scikit-learn. Binary F1 / precision / recall are those
  of class 1; multi-class ones are macro averages. The predicted class is the argmax of the
  probabilities. Scores must be probabilities (checked) unless ``scores='logits'`` says they are
  logits; every function here takes that argument. Only where the AUC alone is asked for (DeLong,
  ``metrics=["auc"]``) are binary scores of any scale taken as they are: the AUC ranks them.
- :func:`bootstrap_ci`: 95 % intervals from ``scipy.stats.bootstrap`` over the test set, resampled
  within each class (stratified: every resample keeps the class counts, so AUC is always defined),
  optionally by whole groups (patients) when items of a group are correlated (slices of a scan).
- :func:`paired_bootstrap`: two methods' predictions on the same test set, resampled together; the
  interval of the difference and a two-sided bootstrap p-value.
- :func:`delong_test`: DeLong, DeLong & Clarke-Pearson (1988) for the difference of two correlated
  AUCs, with the midrank placements of Sun & Xu (2014); checked against pROC's published values.

Inside the bootstrap every metric is a function of how often each test item was drawn (a counts
matrix, one row per resample), computed for all resamples at once with a few matrix products and
cumulative sums; tests check that these batched forms equal scikit-learn's on resamples.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats
from scipy.stats import norm, rankdata
from sklearn import metrics as skm

from sparkct.errors import UserError

__all__ = [
    "METRICS",
    "SCORES",
    "Models",
    "as_probabilities",
    "compute_metrics",
    "bootstrap_ci",
    "units_per_class",
    "paired_bootstrap",
    "delong_test",
    "delong_variance",
    "metrics_from_counts",
    "summarize",
    "interval_coverage",
    "COVERAGE",
    "coverage_at",
    "coverage_note",
]

METRICS = ("auc", "accuracy", "balanced_accuracy", "f1", "precision", "recall")


# ------------------------------------------------------------------------------------------ inputs


SCORES = ("probabilities", "logits")


def as_probabilities(y_score, n_classes: int | None = None, *, scores: str = "probabilities") -> np.ndarray:
    """(n, K) class probabilities from `y_score`: (n,) scores of class 1 (binary; the predicted class
    is 1 where the probability exceeds 0.5) or (n, K) one row per item.

    scores='probabilities' (default) refuses values outside [0, 1] and (n, K) rows that do not sum to
    1: accuracy, F1 and the like cut probabilities at 0.5 (or take the argmax), so logits taken for
    probabilities give wrong numbers without any sign. scores='logits' applies the sigmoid to (n,)
    scores and the softmax to (n, K) rows."""
    if scores not in SCORES:
        raise UserError(f"scores must be 'probabilities' or 'logits', got {scores!r}")
    s = np.asarray(y_score, dtype=np.float64)
    if s.ndim not in (1, 2) or (s.ndim == 2 and s.shape[1] < 2):
        raise UserError(f"scores must be (n,) or (n, classes >= 2), got shape {s.shape}")
    if s.ndim == 1 and n_classes not in (None, 2):
        raise UserError(f"1-D scores are for binary tasks, got n_classes={n_classes}")
    if s.ndim == 2 and n_classes is not None and s.shape[1] != n_classes:
        raise UserError(f"scores have {s.shape[1]} columns for {n_classes} classes")
    if not np.isfinite(s).all():
        raise UserError("predictions contain NaN or infinity")
    if scores == "logits":
        if s.ndim == 1:
            return np.stack([1.0 - _sigmoid(s), _sigmoid(s)], 1)
        z = np.exp(s - s.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)
    if s.size and (s.min() < -_PROB_TOL or s.max() > 1 + _PROB_TOL):
        raise UserError(
            f"scores must be probabilities in [0, 1], got values in [{s.min():.3g}, {s.max():.3g}]: "
            "pass scores='logits' for logits (accuracy and F1 cut probabilities at 0.5)"
        )
    s = np.clip(s, 0.0, 1.0)
    if s.ndim == 1:
        return np.stack([1.0 - s, s], 1)
    sums = s.sum(1)
    if s.size and np.abs(sums - 1.0).max() > _SUM_TOL:
        i = int(np.abs(sums - 1.0).argmax())
        raise UserError(
            f"each row of (n, K) probabilities must sum to 1, row {i} sums to {sums[i]:.6g}: "
            "pass scores='logits' for logits"
        )
    return s / sums[:, None]


# float32 softmax outputs and their means over slices sum to 1 within ~1e-6; a looser bound still
# catches logits and unnormalized scores, which are off by far more
_PROB_TOL = 1e-6
_SUM_TOL = 1e-4


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


def _check(
    y_true, y_score, n_classes=None, scores: str = "probabilities", auc_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, (n, K) probabilities). auc_only: only the AUC will be read, which ranks binary
    scores without a threshold, so any real (n,) scores (a marker, a logit) are taken as they are
    (column 0 then holds no probability; nothing reads it)."""
    y = np.asarray(y_true).reshape(-1)
    if not np.issubdtype(y.dtype, np.integer):
        if y.size and not np.all(np.mod(y, 1) == 0):
            raise UserError("labels must be class indices 0..K-1")
        y = y.astype(np.int64)
    s = np.asarray(y_score, dtype=np.float64)
    if auc_only and s.ndim == 1 and scores in SCORES and n_classes in (None, 2):
        if not np.isfinite(s).all():
            raise UserError("predictions contain NaN or infinity")
        p = np.stack([-s, s], 1)
    else:
        p = as_probabilities(s, n_classes, scores=scores)
    if len(p) != len(y):
        raise UserError(f"{len(y)} labels for {len(p)} predictions")
    k = p.shape[1]
    if y.size and (y.min() < 0 or y.max() >= k):
        raise UserError(f"labels must be in 0..{k - 1}, got {sorted(set(y.tolist()) - set(range(k)))[:5]}")
    missing = sorted(set(range(k)) - set(y.tolist()))
    if missing:
        raise UserError(
            f"the test set has no items of class(es) {missing}: AUC and balanced accuracy need "
            f"every class present (use a larger or stratified test split)"
        )
    return y.astype(np.int64), p


# ------------------------------------------------------------------------------------------ point estimates


def compute_metrics(
    y_true,
    y_score,
    *,
    n_classes: int | None = None,
    metrics: Sequence[str] = METRICS,
    scores: str = "probabilities",
) -> dict[str, float]:
    """The metrics in `metrics` (default all of :data:`METRICS`) from scikit-learn. y_true: class
    indices (n,); y_score: (n,) probabilities of class 1 or (n, K) class probabilities, or logits
    of either shape with scores='logits' (see :func:`as_probabilities`; other scores are refused)."""
    metrics = _check_names(metrics)
    y, p = _check(y_true, y_score, n_classes, scores, auc_only=metrics == ("auc",))
    return _point(y, p, metrics)


def _point(y: np.ndarray, p: np.ndarray, metrics: tuple[str, ...]) -> dict[str, float]:
    """compute_metrics on checked labels and (n, K) probabilities."""
    k = p.shape[1]
    pred = p.argmax(1)
    kw = (
        dict(average="binary", zero_division=0)
        if k == 2
        else dict(average="macro", labels=list(range(k)), zero_division=0)
    )
    fns = {
        # multi-class: one-vs-rest, each class's probability ranking it against the rest, as in the
        # per-class placements of DeLong's test and the bootstrap
        "auc": lambda: (
            skm.roc_auc_score(y, p[:, 1])
            if k == 2
            else skm.roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(k)))
        ),
        "accuracy": lambda: skm.accuracy_score(y, pred),
        "balanced_accuracy": lambda: skm.balanced_accuracy_score(y, pred),
        "f1": lambda: skm.f1_score(y, pred, **kw),
        "precision": lambda: skm.precision_score(y, pred, **kw),
        "recall": lambda: skm.recall_score(y, pred, **kw),
    }
    return {m: float(fns[m]()) for m in metrics}


def _check_names(metrics) -> tuple[str, ...]:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise UserError(f"unknown metric(s) {bad}; choose from {', '.join(METRICS)}")
    return metrics


# ------------------------------------------------------------------------------------------ batched forms


class _Batched:
    """Every metric of resampled test sets given as counts (R, n): how often each item was drawn.

    The confusion matrices are one matrix product; AUC per class sorts the items once by score and
    sums, per tie group, positives x (negatives below + half the tied negatives) with cumulative
    sums (the Mann-Whitney form, exact with ties and repeated items)."""

    def __init__(self, y: np.ndarray, p: np.ndarray):
        self.n, self.k = p.shape
        k = self.k
        pred = p.argmax(1)
        self.cell = np.zeros((self.n, k * k))
        self.cell[np.arange(self.n), y * k + pred] = 1.0
        self.auc_parts = []
        classes = [1] if k == 2 else range(k)
        for c in classes:
            s = p[:, c]
            order = np.argsort(s, kind="stable")
            ss = s[order]
            starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
            pos = (y[order] == c).astype(np.float64)
            self.auc_parts.append((order, starts, pos))

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        """(len(METRICS), R) metric values for counts (R, n)."""
        c = np.asarray(counts, dtype=np.float64)
        k = self.k
        cm = (c @ self.cell).reshape(-1, k, k)  # (R, true, pred)
        total = cm.sum((1, 2))
        tp = np.diagonal(cm, axis1=1, axis2=2)
        support = cm.sum(2)  # per true class
        predicted = cm.sum(1)  # per predicted class
        with np.errstate(invalid="ignore", divide="ignore"):
            rec = np.where(support > 0, tp / support, 0.0)
            prec = np.where(predicted > 0, tp / predicted, 0.0)
            f1d = support + predicted
            f1 = np.where(f1d > 0, 2 * tp / f1d, 0.0)
            bal = np.where(support > 0, tp / support, np.nan)
            bal = np.nanmean(bal, 1) if bal.shape[0] else np.zeros(0)
        if k == 2:
            rec, prec, f1 = rec[:, 1], prec[:, 1], f1[:, 1]
        else:
            rec, prec, f1 = rec.mean(1), prec.mean(1), f1.mean(1)
        aucs = []
        for order, starts, pos in self.auc_parts:
            co = c[:, order]
            npos = np.add.reduceat(co * pos, starts, axis=1)
            nneg = np.add.reduceat(co * (1 - pos), starts, axis=1)
            below = np.cumsum(nneg, 1) - nneg
            with np.errstate(invalid="ignore", divide="ignore"):
                aucs.append((npos * (below + 0.5 * nneg)).sum(1) / (npos.sum(1) * nneg.sum(1)))
        auc = np.mean(aucs, 0)
        return np.stack([auc, tp.sum(1) / total, bal, f1, prec, rec])


def metrics_from_counts(y_true, y_score, counts, *, scores: str = "probabilities") -> dict[str, np.ndarray]:
    """The metrics of resampled test sets, counts (R, n) = how often each item is drawn (the batched
    form the bootstrap uses; equal to :func:`compute_metrics` on the repeated items)."""
    y, p = _check(y_true, y_score, scores=scores)
    out = _Batched(y, p)(np.atleast_2d(counts))
    return dict(zip(METRICS, out))


# ------------------------------------------------------------------------------------------ bootstrap


def _units(y: np.ndarray, groups) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(unit of each item, label of each unit, unit indices per stratum). A unit is an item, or a
    group (patient) when `groups` is given; a group's stratum is its largest label (a patient with
    any positive slice is positive), so every resample keeps both the groups' and the items' classes
    present."""
    if groups is None:
        unit = np.arange(len(y))
        ulab = y
    else:
        g = np.asarray(groups).reshape(-1)
        if len(g) != len(y):
            raise UserError(f"{len(g)} groups for {len(y)} labels")
        _, unit = np.unique(g, return_inverse=True)
        ulab = np.full(unit.max() + 1, -1, dtype=np.int64)
        np.maximum.at(ulab, unit, y)
    strata = [np.flatnonzero(ulab == v) for v in np.unique(ulab)]
    return unit, ulab, strata


def units_per_class(y_true, groups=None) -> dict[int, int]:
    """{class: units} as the bootstrap resamples them (items, or groups such as patients counted in the
    class of their largest label), for the classes present. Each needs at least 2 units."""
    _, ulab, strata = _units(np.asarray(y_true).reshape(-1), groups)
    return {int(ulab[s[0]]): len(s) for s in strata}


def _run_bootstrap(
    statistic_of_counts,
    unit: np.ndarray,
    strata,
    *,
    n_resamples: int,
    confidence: float,
    method: str,
    seed,
    batch: int | None,
):
    n_units = int(unit.max()) + 1 if len(unit) else 0
    if any(len(s) < 2 for s in strata):
        small = [len(s) for s in strata]
        raise UserError(f"bootstrap needs at least 2 units (items or patients) per class, got {small}")

    def statistic(*idx, axis=-1):
        # One array of drawn unit indices per stratum, batch dims in front (resamples or jackknife).
        lead = np.broadcast_shapes(*(a.shape[:-1] for a in idx))
        flat = np.concatenate([np.broadcast_to(a, lead + a.shape[-1:]).reshape(-1, a.shape[-1]) for a in idx], 1)
        r = flat.shape[0]
        uc = np.bincount((np.arange(r)[:, None] * n_units + flat).ravel(), minlength=r * n_units)
        counts = uc.reshape(r, n_units)[:, unit]
        out = statistic_of_counts(counts)  # (M, r)
        return out.reshape(out.shape[:-1] + lead)

    m = {"bca": "BCa", "percentile": "percentile", "basic": "basic"}.get(str(method).lower())
    if m is None:
        raise UserError(f"CI method must be 'BCa', 'percentile' or 'basic', got {method!r}")
    if not 0 < confidence < 1:
        raise UserError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise UserError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    data = tuple(s.astype(np.int64) for s in strata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate BCa (a statistic constant over resamples) -> fallback below
        res = stats.bootstrap(
            data,
            statistic,
            n_resamples=n_resamples,
            vectorized=True,
            paired=False,
            confidence_level=confidence,
            method=m,
            rng=rng,
            batch=batch,
        )
    low = np.array(res.confidence_interval.low, dtype=np.float64, ndmin=1)
    high = np.array(res.confidence_interval.high, dtype=np.float64, ndmin=1)
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    bad = ~(np.isfinite(low) & np.isfinite(high))
    if bad.any():  # BCa undefined (e.g. accuracy 1.0 in every resample): the percentile interval
        a = (1 - confidence) / 2
        q = np.nanquantile(dist[bad], [a, 1 - a], axis=-1)
        low[bad], high[bad] = q[0], q[1]
    return low, high, dist


class Models(list):
    """Several models' scores on the same test items (e.g. one fine-tuning per seed): the bootstrap and
    DeLong functions then work on the metric averaged over the models (the interval of a mean over
    seeds, which holds the test-set uncertainty; the seeds' spread is reported beside it)."""


def _models(y_true, y_score, n_classes=None, scores: str = "probabilities", auc_only: bool = False):
    """(y, [probabilities per model]) from one score array or a :class:`Models` list of them."""
    lst = list(y_score) if isinstance(y_score, Models) else [y_score]
    if not lst:
        raise UserError("no predictions given")
    y, p0 = _check(y_true, lst[0], n_classes, scores, auc_only)
    return y, [p0] + [_check(y, s, p0.shape[1], scores, auc_only)[1] for s in lst[1:]]


def _mean_point(y, probs, metrics) -> dict[str, float]:
    vals = [_point(y, p, metrics) for p in probs]
    return {m: float(np.mean([v[m] for v in vals])) for m in metrics}


def _mean_stat(y, probs, rows):
    stats = [_Batched(y, p) for p in probs]
    return lambda c: np.mean([st(c)[rows] for st in stats], 0)


def bootstrap_ci(
    y_true,
    y_score,
    *,
    groups=None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    method: str = "BCa",
    seed=0,
    batch: int | None = 2000,
    metrics: Sequence[str] = METRICS,
    scores: str = "probabilities",
) -> dict[str, dict[str, float]]:
    """Each metric with its bootstrap confidence interval: name -> {value, low, high, se}.

    The test set is resampled within each class (stratified); with `groups` (e.g. patient ids) whole
    groups are resampled, stratified by a group's largest label. method: scipy's 'BCa' (default; a
    metric whose resamples are all equal falls back to the percentile interval), 'percentile' or
    'basic'. `batch` bounds memory (resamples evaluated at once). `y_score` may be
    :class:`Models` (several seeds): the metric is then their mean."""
    metrics = _check_names(metrics)
    rows = [METRICS.index(m) for m in metrics]
    y, probs = _models(y_true, y_score, scores=scores, auc_only=metrics == ("auc",))
    point = _mean_point(y, probs, metrics)
    unit, _, strata = _units(y, groups)
    low, high, dist = _run_bootstrap(
        _mean_stat(y, probs, rows),
        unit,
        strata,
        n_resamples=n_resamples,
        confidence=confidence,
        method=method,
        seed=seed,
        batch=batch,
    )
    se = np.nanstd(dist, axis=-1, ddof=1) if dist.shape[-1] > 1 else np.full(len(metrics), np.nan)
    return {
        name: {"value": point[name], "low": float(low[i]), "high": float(high[i]), "se": float(se[i])}
        for i, name in enumerate(metrics)
    }


def paired_bootstrap(
    y_true,
    score_a,
    score_b,
    *,
    groups=None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    method: str = "percentile",
    seed=0,
    batch: int | None = 2000,
    metrics: Sequence[str] = METRICS,
    scores: str = "probabilities",
) -> dict[str, dict[str, float]]:
    """Method A minus method B on the same test items, resampled together (paired, stratified as in
    :func:`bootstrap_ci`): name -> {a, b, diff, low, high, p}. p is the two-sided bootstrap p-value
    for "no difference": twice the smaller share of resampled differences on either side of 0
    (identical predictions give 1; with R resamples the smallest is 2 / (R + 1)). Either side may be
    :class:`Models` (the mean over its seeds)."""
    metrics = _check_names(metrics)
    rows = [METRICS.index(m) for m in metrics]
    y, pa = _models(y_true, score_a, scores=scores, auc_only=metrics == ("auc",))
    _, pb = _models(y, score_b, pa[0].shape[1], scores, metrics == ("auc",))
    ma, mb = _mean_point(y, pa, metrics), _mean_point(y, pb, metrics)
    unit, _, strata = _units(y, groups)
    sa, sb = _mean_stat(y, pa, rows), _mean_stat(y, pb, rows)
    low, high, dist = _run_bootstrap(
        lambda c: sa(c) - sb(c),
        unit,
        strata,
        n_resamples=n_resamples,
        confidence=confidence,
        method=method,
        seed=seed,
        batch=batch,
    )
    r = dist.shape[-1]
    le = (dist <= 0).sum(-1)
    ge = (dist >= 0).sum(-1)
    pval = np.minimum(1.0, 2 * (np.minimum(le, ge) + 1) / (r + 1))
    return {
        name: {
            "a": ma[name],
            "b": mb[name],
            "diff": ma[name] - mb[name],
            "low": float(low[i]),
            "high": float(high[i]),
            "p": float(pval[i]),
        }
        for i, name in enumerate(metrics)
    }


# ------------------------------------------------------------------------------------------ DeLong


def _placements(y: np.ndarray, p: np.ndarray) -> tuple[float, np.ndarray]:
    """(AUC, influence of each item). For binary tasks the AUC is of class 1; for K classes the
    one-vs-rest macro average. An item's influence for class c's AUC is its placement value (DeLong's
    V10 for a positive: the share of negatives it outranks, ties half; V01 for a negative: the share
    of positives that outrank it) divided by the size of its side, via midranks (Sun & Xu 2014)."""
    k = p.shape[1]
    classes = [1] if k == 2 else list(range(k))
    psi = np.zeros(len(y))
    aucs = []
    for c in classes:
        s = p[:, c]
        pos = y == c
        m, n = int(pos.sum()), int((~pos).sum())
        r_all = rankdata(s)
        r_pos = rankdata(s[pos])
        r_neg = rankdata(s[~pos])
        v10 = (r_all[pos] - r_pos) / n  # positives: negatives below (ties 1/2)
        v01 = 1.0 - (r_all[~pos] - r_neg) / m  # negatives: positives above (ties 1/2)
        auc = float(v10.mean())
        aucs.append(auc)
        inf = np.zeros(len(y))
        inf[pos] = (v10 - auc) / m
        inf[~pos] = (v01 - auc) / n
        psi += inf / len(classes)
    return float(np.mean(aucs)), psi


def _stratified_var(psi: np.ndarray, strata_of: np.ndarray) -> float:
    """Sum over strata of n_s/(n_s-1) x the sum of squared centred influences: with the classes as
    strata this is DeLong's S10/m + S01/n for a binary AUC."""
    v = 0.0
    for s in np.unique(strata_of):
        x = psi[strata_of == s]
        if len(x) > 1:
            v += len(x) / (len(x) - 1) * float(((x - x.mean()) ** 2).sum())
    return v


def delong_variance(y_true, y_score, *, scores: str = "probabilities") -> tuple[float, float]:
    """(AUC, DeLong variance of the AUC). Multi-class: the one-vs-rest macro AUC, its variance from
    the same placements with the classes as strata (DeLong's estimator when K = 2)."""
    y, p = _check(y_true, y_score, scores=scores, auc_only=True)
    auc, psi = _placements(y, p)
    return auc, _stratified_var(psi, y)


def _mean_placements(y, probs) -> tuple[float, np.ndarray]:
    parts = [_placements(y, p) for p in probs]
    return float(np.mean([a for a, _ in parts])), np.mean([psi for _, psi in parts], 0)


def delong_test(
    y_true, score_a, score_b, *, confidence: float = 0.95, scores: str = "probabilities"
) -> dict[str, float]:
    """DeLong's test of AUC(A) = AUC(B) for two methods' scores on the same test items.

    Returns auc_a, auc_b, diff, var_a, var_b, cov, z, p (two-sided, normal), low/high (the CI of the
    difference). Identical predictions give z = 0, p = 1. Multi-class: macro one-vs-rest AUCs (see
    :func:`delong_variance`). Either side may be :class:`Models`: the AUC averaged over its seeds,
    whose influence values are the average of theirs. Items must be independent (one per patient)."""
    y, pa = _models(y_true, score_a, scores=scores, auc_only=True)
    _, pb = _models(y, score_b, pa[0].shape[1], scores, True)
    auc_a, psi_a = _mean_placements(y, pa)
    auc_b, psi_b = _mean_placements(y, pb)
    var_a = _stratified_var(psi_a, y)
    var_b = _stratified_var(psi_b, y)
    var_d = _stratified_var(psi_a - psi_b, y)
    cov = (var_a + var_b - var_d) / 2
    diff = auc_a - auc_b
    if var_d <= 1e-15 * max(1.0, var_a + var_b):
        z, pval, half = 0.0 if diff == 0 else float(np.sign(diff) * np.inf), 1.0 if diff == 0 else 0.0, 0.0
    else:
        se = float(np.sqrt(var_d))
        z = diff / se
        pval = float(2 * norm.sf(abs(z)))
        half = float(norm.ppf(0.5 + confidence / 2) * se)
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "diff": diff,
        "var_a": var_a,
        "var_b": var_b,
        "cov": cov,
        "z": float(z),
        "p": float(pval),
        "low": diff - half,
        "high": diff + half,
    }


def summarize(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean of per-seed values with a t interval over seeds (n >= 2), for reports."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    if len(v) == 1:
        return {"mean": float(v[0]), "low": float("nan"), "high": float("nan"), "n": 1}
    lo, hi = stats.t.interval(confidence, len(v) - 1, loc=v.mean(), scale=stats.sem(v)) if v.std() > 0 else (v[0], v[0])
    return {"mean": float(v.mean()), "low": float(lo), "high": float(hi), "n": int(len(v))}


# ------------------------------------------------------------------------------------------ coverage


def _pairwise_auc(pos: np.ndarray, neg: np.ndarray):
    """counts (r, n) -> (M, r) AUCs of M score vectors at once: pos (M, P), neg (M, Q) the scores of
    the positive and negative items (the Mann-Whitney form with repeated items, ties 1/2, as
    :class:`_Batched`)."""
    m, n_pos = pos.shape
    n_neg = neg.shape[1]
    h = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])  # (M, P, Q)
    h = np.ascontiguousarray(h.transpose(1, 0, 2).reshape(n_pos, m * n_neg))  # one BLAS product per call

    def auc(counts: np.ndarray) -> np.ndarray:
        c = np.asarray(counts, dtype=np.float64)
        cp, cn = np.ascontiguousarray(c[:, :n_pos]), c[:, n_pos:]
        num = ((cp @ h).reshape(len(c), m, n_neg) * cn[:, None, :]).sum(2)  # (r, M)
        return num.T / (cp.sum(1) * cn.sum(1))

    return auc


def interval_coverage(
    n_patients: int,
    *,
    slices_per_patient: int = 17,
    positive_slices: int = 6,
    positive_share: float = 0.45,
    auc: float = 0.7,
    patient_share: float = 0.5,
    n_sims: int = 200,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    method: str = "BCa",
    chunk: int = 25,
    batch: int = 250,
    seed=0,
) -> dict[str, float]:
    """Coverage, by simulation, of the AUC interval of :func:`bootstrap_ci` with patient groups (the
    one the fine-tuning test and the experiment's report give) at a test set of `n_patients`.

    Each simulated test set: round(positive_share x n_patients) patients with a nodule (at least 2
    of each kind), `slices_per_patient` slices each, `positive_slices` of them positive in a patient
    with a nodule; a slice's score is the patient's offset + the slice's noise (variances
    patient_share and 1 - patient_share: scores dominated by per-patient offsets, as fine-tuned
    models give) + d on positive slices, with d chosen so that the population AUC, the chance that a
    positive slice outscores a negative slice of another patient, is `auc`. Every interval is
    computed by the same stratified patient resampling and scipy BCa as :func:`bootstrap_ci`
    (checked equal in the tests); the sims of one `chunk` share their resample indices (vectorized:
    all their AUCs come from one matrix product per `batch` of resamples), chunks draw their own.

    Returns coverage (share of intervals holding the true AUC), se (its binomial standard error),
    n_sims, n_resamples, mean_width, true_auc, seconds."""
    if n_patients < 4 or not 0 < positive_slices <= slices_per_patient or not 0 < positive_share < 1:
        raise UserError("need n_patients >= 4, 0 < positive_slices <= slices_per_patient, 0 < positive_share < 1")
    if not 0.5 <= auc < 1 or not 0 <= patient_share < 1 or n_sims < 1 or chunk < 1:
        raise UserError("need 0.5 <= auc < 1, 0 <= patient_share < 1, n_sims >= 1, chunk >= 1")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n_pos_pat = int(np.clip(round(positive_share * n_patients), 2, n_patients - 2))
    group = np.repeat(np.arange(n_patients), slices_per_patient)
    y = np.zeros(len(group), np.int64)
    for p in range(n_pos_pat):
        y[p * slices_per_patient : p * slices_per_patient + positive_slices] = 1
    # items sorted positives first, so that counts split into the positive and negative blocks
    order = np.argsort(-y, kind="stable")
    y, group = y[order], group[order]
    unit, _, strata = _units(y, group)
    d = float(np.sqrt(2.0) * norm.ppf(auc))  # the difference of two independent slices has variance 2
    hits, widths = [], []
    for start in range(0, n_sims, chunk):
        m = min(chunk, n_sims - start)
        offset = rng.normal(0.0, np.sqrt(patient_share), (m, n_patients))[:, group]
        s = offset + rng.normal(0.0, np.sqrt(1 - patient_share), (m, len(y))) + d * y
        n_pos = int(y.sum())
        low, high, _ = _run_bootstrap(
            _pairwise_auc(s[:, :n_pos], s[:, n_pos:]),
            unit,
            strata,
            n_resamples=n_resamples,
            confidence=confidence,
            method=method,
            seed=rng.integers(2**63),
            batch=batch,
        )
        hits.append((low <= auc) & (auc <= high))
        widths.append(high - low)
    cover = float(np.mean(np.concatenate(hits)))
    return {
        "coverage": cover,
        "se": float(np.sqrt(cover * (1 - cover) / n_sims)),
        "n_sims": n_sims,
        "n_resamples": n_resamples,
        "mean_width": float(np.mean(np.concatenate(widths))),
        "true_auc": auc,
        "seconds": time.perf_counter() - t0,
    }


#: Simulated coverage of the 95 % patient-bootstrap BCa AUC interval (1,000 resamples) by test
#: patients, made once with ``interval_coverage(n, n_sims=1000, n_resamples=1000, seed=2026)`` and the
#: defaults (17 slices per patient, 6 of them positive in the 45 % of patients with a nodule, AUC 0.7,
#: half the score variance per patient: the built-in experiment's test set). Standard error about
#: 0.8 points each; 306 s in all on a shared 2-core CPU. Beyond 100 patients coverage_at gives the
#: 100-patient value, which is within the table's error of nominal.
COVERAGE: dict[int, float] = {12: 0.904, 18: 0.931, 24: 0.933, 36: 0.924, 48: 0.943, 72: 0.944, 100: 0.945}
COVERAGE_HOW = (
    "1,000 simulated test sets per size, 17 slices per patient, patient offsets half the score variance, "
    "AUC 0.7; sparkct.eval.metrics.COVERAGE"
)
#: below this simulated coverage a 95 % interval is reported as short of nominal (nominal 0.95 less
#: about the table's standard error)
COVERAGE_SHORT = 0.94


def coverage_at(n_patients: int) -> float:
    """The stored simulated coverage of the 95 % interval at `n_patients` test patients: interpolated
    in log size between the :data:`COVERAGE` sizes, that of the nearest size outside them."""
    sizes = sorted(COVERAGE)
    return float(np.interp(np.log(n_patients), np.log(sizes), [COVERAGE[n] for n in sizes]))


def coverage_note(n_patients: int, confidence: float = 0.95) -> str | None:
    """One sentence for a report beside 95 % intervals from a test set of `n_patients` patients when
    their simulated coverage falls short of nominal (:data:`COVERAGE_SHORT`), else None."""
    sizes = sorted(COVERAGE)
    if confidence != 0.95:
        return None
    cov = coverage_at(n_patients)
    if cov >= COVERAGE_SHORT:
        return None
    where = f"at {n_patients} test patients" if n_patients >= sizes[0] else f"at {sizes[0]}, the fewest simulated"
    return (
        f"With {n_patients} test patients the 95 % intervals are too narrow: simulated, they hold the true "
        f"AUC {100 * cov:.0f} % of the time {where} ({COVERAGE_HOW}). Read them as about "
        f"{100 * cov:.0f} % intervals; more test patients bring them closer to 95 %."
    )
