"""Agreement between raters (a model and human judges, or the judges among themselves): Cohen's kappa
and Krippendorff's alpha as pure functions of sufficient statistics, batched like `evaluation.metrics`.

Conventions
- Labels are indices into the label set's order (best first); weighted kappa and ordinal alpha read
  that order as the scale (Exact > Partial > Irrelevant; E > S > C > I).
- Functions take tables with a leading batch shape `...`: one query-bootstrap replicate is one
  weighted sum of per-query tables, the point estimate the plain sum (see `evaluation.bootstrap`).
- An undefined value (a table whose expected disagreement is 0, e.g. both raters always say the same
  label) is NaN.

Definitions (the tests check each against the maintained implementation named, and hand-worked cases)
- Cohen's kappa of a contingency table T (rater A on rows, rater B on columns, n = sum of T):
  kappa = 1 - n * sum(W * T) / sum(W * outer(row sums, column sums)), with disagreement weights W:
  unweighted [i != j]; linear |i - j| / (C - 1); quadratic ((i - j) / (C - 1))^2. This is
  `statsmodels.stats.inter_rater.cohens_kappa(T, wt=None | "linear" | "quadratic")`.
- Per class: one-vs-rest kappa, the unweighted kappa of the 2x2 table "label c or not" of both raters.
- Krippendorff's alpha of a coincidence matrix O (C x C, symmetric): with n_c its marginals and n their
  sum, alpha = 1 - (n - 1) * sum(O * D) / sum(outer(n_c, n_c) * D); D nominal [c != k], ordinal
  (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2 (Krippendorff 2011). This is `krippendorff.alpha(...,
  level_of_measurement="nominal" | "ordinal")`. A unit (a judged pair) with m >= 2 values adds
  n_uc (n_uk - [c == k]) / (m - 1) to O[c, k] (`coincidences`); a unit judged once pairs with nothing
  and adds nothing. A unit with two values (a model's label and a gold label) adds e_a e_b' + e_b e_a',
  so the coincidence matrix of a contingency table T is T + T'.

The humans' ceiling. Where several human judgments of a pair exist, the judges' own agreement bounds
what any labeller can show against them: a model cannot agree with a judge more than judges agree with
each other. Judges have no fixed roles (judge 1 of one pair is not judge 1 of the next), so their
agreement is computed from the coincidence matrix of their judgments: kappa on it uses pooled
marginals, which with the same number of judgments per pair is Fleiss' kappa
(`statsmodels.stats.inter_rater.fleiss_kappa`), and alpha is Krippendorff's alpha of the judgments. A
model is put on the same footing on the same pairs: each of a pair's m judgments paired with the
model's label is one two-value unit, so its table is sum over pairs of votes x onehot(label)
(`against_votes`) and its statistics are those of the coincidence matrix T + T' (pooled marginals
too): "a model against one judge" next to "one judge against another".
"""

from __future__ import annotations

import numpy as np

from evaluation.metrics import ratio

KAPPA_WEIGHTS = {"kappa": "none", "kappa_linear": "linear", "kappa_quadratic": "quadratic"}
ALPHA_LEVELS = {"alpha_ordinal": "ordinal", "alpha_nominal": "nominal"}
AGREEMENT = {
    "kappa": "Cohen's kappa (unweighted)",
    "kappa_linear": "Cohen's kappa, linear weights |i - j| over the label set's order",
    "kappa_quadratic": "Cohen's kappa, quadratic weights (i - j)^2 over the label set's order",
    "alpha_ordinal": "Krippendorff's alpha, ordinal distances over the label set's order",
    "alpha_nominal": "Krippendorff's alpha, nominal distances",
    "class_kappa": "per label: one-vs-rest Cohen's kappa (the label or not)",
}
# Prefixes of the agreement metrics of a model evaluation (see `evaluation.evaluate.METRICS`): against gold
# has none; on the pairs with several human judgments, the judges among themselves, the model against one
# judge, and the model minus the judges (paired: the same resampled queries).
HUMANS, AGAINST_HUMANS, GAP = "humans_", "vs_humans_", "_gap"


def disagreement_weights(n_classes: int, kind: str) -> np.ndarray:
    """`(C, C)` disagreement weights of weighted kappa over positions in the label set: 'none' [i != j],
    'linear' |i - j| / (C - 1), 'quadratic' ((i - j) / (C - 1))^2."""
    distance = np.abs(np.subtract.outer(np.arange(n_classes), np.arange(n_classes))) / max(n_classes - 1, 1)
    weights = {"none": (distance > 0).astype(float), "linear": distance, "quadratic": distance**2}
    if kind not in weights:
        raise ValueError(f"unknown kappa weighting {kind!r}; known: {sorted(weights)}")
    return weights[kind]


def cohens_kappa(table: np.ndarray, kind: str = "none") -> np.ndarray:
    """Cohen's kappa of `(..., C, C)` contingency tables (rows rater A, columns rater B) -> `(...)`."""
    table = np.asarray(table, float)
    weights = disagreement_weights(table.shape[-1], kind)
    n = table.sum(axis=(-2, -1))
    expected = table.sum(axis=-1)[..., :, None] * table.sum(axis=-2)[..., None, :]
    observed = n * (weights * table).sum(axis=(-2, -1))
    return 1.0 - ratio(observed, (weights * expected).sum(axis=(-2, -1)), np.nan)


def class_kappa(table: np.ndarray) -> np.ndarray:
    """One-vs-rest unweighted kappa per label of `(..., C, C)` tables -> `(..., C)`."""
    table = np.asarray(table, float)
    n = table.sum(axis=(-2, -1))[..., None]
    both = np.diagonal(table, axis1=-2, axis2=-1)
    rows, columns = table.sum(axis=-1), table.sum(axis=-2)
    observed = ratio(n - rows - columns + 2 * both, n, np.nan)
    expected = ratio(rows * columns + (n - rows) * (n - columns), n * n, np.nan)
    return ratio(observed - expected, 1.0 - expected, np.nan)


def coincidences(votes: np.ndarray) -> np.ndarray:
    """Krippendorff's coincidence matrix of each unit: `(..., C)` value counts -> `(..., C, C)`; a unit
    with fewer than two values adds nothing (sum over units, or weight them, for a sample's matrix)."""
    votes = np.asarray(votes, float)
    m = votes.sum(axis=-1)[..., None, None]
    pairs = votes[..., :, None] * votes[..., None, :] - votes[..., None] * np.eye(votes.shape[-1])
    return ratio(pairs, np.where(m >= 2, m - 1, 0), 0.0)


def _ordinal_distances(marginals: np.ndarray) -> np.ndarray:
    """`(..., C)` marginals -> `(..., C, C)` ordinal distances (mid-rank differences squared)."""
    mid = np.cumsum(marginals, axis=-1) - marginals / 2.0
    return (mid[..., None, :] - mid[..., :, None]) ** 2


def krippendorff_alpha(coincidence: np.ndarray, level: str = "ordinal") -> np.ndarray:
    """Krippendorff's alpha of `(..., C, C)` coincidence matrices -> `(...)`; level 'ordinal' or 'nominal'."""
    coincidence = np.asarray(coincidence, float)
    marginals = coincidence.sum(axis=-2)
    n = marginals.sum(axis=-1)
    if level == "nominal":
        distances = disagreement_weights(coincidence.shape[-1], "none")
    elif level == "ordinal":
        distances = _ordinal_distances(marginals)
    else:
        raise ValueError(f"unknown level of measurement {level!r}; known: ['nominal', 'ordinal']")
    observed = (n - 1.0) * (coincidence * distances).sum(axis=(-2, -1))
    expected = (marginals[..., :, None] * marginals[..., None, :] * distances).sum(axis=(-2, -1))
    return np.where(n > 1, 1.0 - ratio(observed, expected, np.nan), np.nan)


def agreement_scores(table: np.ndarray, coincidence: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every metric of `AGREEMENT` for `(..., C, C)` tables: kappas from `table`, alphas from `coincidence`
    (default: `table + table'`, the coincidences of a two-rater table)."""
    table = np.asarray(table, float)
    if coincidence is None:
        coincidence = table + np.swapaxes(table, -1, -2)
    out = {name: cohens_kappa(table, kind) for name, kind in KAPPA_WEIGHTS.items()}
    out |= {name: krippendorff_alpha(coincidence, level) for name, level in ALPHA_LEVELS.items()}
    out["class_kappa"] = class_kappa(table)
    return out


def against_votes(votes: np.ndarray, label: np.ndarray) -> np.ndarray:
    """`(N, C, C)`: pair i's judgments (rows, `votes[i]` counts) against the model's `label[i]` (column)."""
    table = np.zeros((*np.shape(votes), np.shape(votes)[-1]))
    table[np.arange(len(label)), :, label] = votes
    return table


def ceiling_scores(humans: np.ndarray, model: np.ndarray) -> dict[str, np.ndarray]:
    """The judges' agreement, a model's against one judge and the gap (model - judges), from `(..., C, C)`
    sums of `coincidences(votes)` (`humans`) and `against_votes` (`model`) over the same pairs."""
    judges = agreement_scores(humans, humans)
    symmetric = model + np.swapaxes(model, -1, -2)
    labeller = agreement_scores(symmetric, symmetric)
    out = {f"{HUMANS}{name}": value for name, value in judges.items()}
    out |= {f"{AGAINST_HUMANS}{name}": value for name, value in labeller.items()}
    return out | {f"{AGAINST_HUMANS}{name}{GAP}": labeller[name] - judges[name] for name in judges}
