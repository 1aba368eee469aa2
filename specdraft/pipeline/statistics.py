"""Statistics a comparison's claims rest on: the training seed as the unit of replication.

A recipe's effect is the difference of its metric to the baseline recipe's, one difference per
training seed (each seed's metric over the same prompts). Prompts are not independent trials of a
recipe: two recipes trained on one seed share every prompt's noise from that seed, so a test over
prompts with seeds averaged away says nothing about the next training run. Here:

- `seed_test`: Student's paired t-test over the per-seed differences (df = seeds - 1), its 95 %
  confidence interval and the standardised effect d_z = mean / sd of the differences;
- `holm`: Holm's step-down adjustment across every test of one results file;
- `can_reject`: whether a sign-flip test over n pairs can reach p < level at all (it cannot below
  five pairs at 0.05: 2 / 2^4 = 0.125), so no p-value is printed for one that cannot.
"""

from __future__ import annotations

import math

from scipy import stats

LEVEL = 0.05


def seed_test(diffs: list[float]) -> dict:
    """Paired t-test of mean(diffs) = 0 over training seeds, with its 95 % interval.

    `diffs`: one value per seed, recipe minus baseline. Fewer than two seeds, or differences
    without spread, give no p-value (`p_seed` None): a test needs a variance to judge against."""
    diffs = [float(d) for d in diffs if d is not None and not math.isnan(d)]
    n = len(diffs)
    mean = sum(diffs) / n if n else None
    result = {"n_seeds": n, "mean_diff": mean, "p_seed": None, "ci95": None, "effect_size": None}
    if n < 2:
        return result
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0.0:
        return result
    se = sd / math.sqrt(n)
    t = mean / se
    half = float(stats.t.ppf(0.975, n - 1)) * se
    result.update(
        p_seed=float(2 * stats.t.sf(abs(t), n - 1)),
        ci95=[mean - half, mean + half],
        effect_size=mean / sd,
        t=t,
    )
    return result


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None and does not count as a test)."""
    indexed = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(indexed)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def can_reject(pairs: int, level: float = LEVEL) -> bool:
    """Whether a two-sided sign-flip test over `pairs` paired differences can give p < level:
    its smallest p-value is 2 / 2^pairs."""
    return pairs > 0 and 2.0 / 2**pairs < level
