"""Whether the post-mortem's intervals cover what they claim at the seed count a run has.

An interval is only as good as its coverage, and with three seeds the seed share of the
error is estimated from two degrees of freedom. So the post-mortem checks it on every run, at
that run's seed count, image count, bootstrap replicates and levels (95 % and the rule's
adjusted one), on simulated data with a known truth, run through `bootstrap.hierarchical_diff`
exactly as the post-mortem calls it (a drift: each Phase 2 seed minus the one Phase 1
reference, on the same images). A metric is the mean of per-image scores, so the truth is
known::

    Phase 1, image i:         a_i
    Phase 2, seed s, image i: a_i + delta + u_s + c_i + e_si

with delta = 0 (the truth), u_s ~ N(0, seed_sd^2) the seed's training effect, c_i ~ N(0, 1)
the variant's image-specific change shared by every seed and e_si ~ N(0, 1) the
seed-and-image noise. The image standard error of the mean over S seeds is
sqrt((1 + 1/S) / n); ``seed_sd`` is set to `SPREADS` times it. `benchmarks/bench_coverage.py`
prints the same for several seed counts and both interval methods.

Hand-written: the simulation is the statement of what the interval is meant to cover; no
library knows this project's hierarchical interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from defectfusion.analysis.bootstrap import (
    CI_LEVEL,
    SetMetrics,
    hierarchical_diff,
    image_replicates,
    seed_replicates,
    seed_t_interval,
)

SPREADS = (0.5, 1.0, 2.0, 5.0)  # seed SD as a multiple of the image standard error


def _metric(x: np.ndarray, counts: np.ndarray) -> SetMetrics:
    """A mean-of-images metric on the full split and on every image replicate."""
    return SetMetrics({"m": float(x.mean())}, {"m": counts @ x / len(x)})


def simulate_coverage(
    method: str,
    n_seeds: int,
    spread: float,
    trials: int,
    n_images: int = 200,
    n_boot: int = 500,
    seed: int = 0,
    levels: Sequence[float] = (CI_LEVEL,),
) -> dict[float, float]:
    """Per level, the fraction of `trials` whose interval covers the true difference (0).
    Levels other than 95 % are the seed_t interval rebuilt from the same spread, as the
    post-mortem's multiplicity adjustment does; the percentile method has only its own."""
    if method != "seed_t" and tuple(levels) != (CI_LEVEL,):
        raise ValueError(f"{method}: only the {CI_LEVEL:g} % interval")
    rng = np.random.default_rng([seed, n_seeds, int(spread * 100)])
    image_se = math.sqrt((1.0 + 1.0 / n_seeds) / n_images)
    hits = dict.fromkeys(levels, 0)
    for _ in range(trials):
        counts = image_replicates(n_images, n_boot, rng)
        idx = seed_replicates(n_seeds, n_boot, rng)
        a = rng.normal(0.0, 1.0, n_images)
        shared = rng.normal(0.0, 1.0, n_images)
        u = rng.normal(0.0, spread * image_se, n_seeds)
        ref = _metric(a, counts)
        sets = [
            _metric(a + u[s] + shared + rng.normal(0.0, 1.0, n_images), counts)
            for s in range(n_seeds)
        ]
        out = hierarchical_diff(sets, ref, idx, "m", method=method)
        for level in levels:
            lo, hi = out["ci"] if level == CI_LEVEL else seed_t_interval(out["diff"], out, level)
            hits[level] += lo <= 0.0 <= hi
    return {level: hits[level] / trials for level in levels}


def interval_coverage(
    n_seeds: int, n_images: int, n_boot: int, levels: Sequence[float], trials: int, seed: int = 0
) -> dict[str, Any]:
    """The seed_t interval's coverage at this run's design, for each of `SPREADS` and
    `levels`. ``covers``: no level falls short of its nominal value by more than two Monte
    Carlo standard errors (of the nominal rate) at any spread."""
    rows = []
    for spread in SPREADS:
        cov = simulate_coverage(
            "seed_t", n_seeds, spread, trials, n_images, n_boot, seed, levels
        )
        rows += [{"spread": spread, "level": level, "coverage": cov[level]} for level in levels]
    tolerance = {
        level: 2.0 * math.sqrt(level / 100 * (1 - level / 100) / trials) for level in levels
    }
    worst = [min(r["coverage"] for r in rows if r["level"] == level) for level in levels]
    return {
        "method": "seed_t",
        "n_seeds": n_seeds,
        "n_images": n_images,
        "n_boot": n_boot,
        "trials": trials,
        "spreads": list(SPREADS),
        "levels": list(levels),
        "rows": rows,
        "min_coverage": worst,
        "tolerance": [tolerance[level] for level in levels],
        "covers": all(r["coverage"] >= r["level"] / 100 - tolerance[r["level"]] for r in rows),
    }
