"""Coverage of the post-mortem's intervals at the seed counts a run has.

    python benchmarks/bench_coverage.py [--trials 1000] [--seeds 3 5 8]

Simulated data with a known truth, run through `bootstrap.hierarchical_diff` exactly as the
post-mortem calls it (a drift: each Phase 2 seed minus the one Phase 1 reference, on the
same images). A metric is the mean of per-image scores, so the truth is known:

    Phase 1, image i:        a_i
    Phase 2, seed s, image i: a_i + delta + u_s + c_i + e_si

with delta = 0 (the truth), u_s ~ N(0, seed_sd^2) the seed's training effect, c_i ~ N(0, 1)
the variant's image-specific change shared by every seed and e_si ~ N(0, 1) the seed-and-image
noise. The image standard error of the mean over S seeds is sqrt((1 + 1/S) / n); ``seed_sd``
is set to 0.5x to 5x of it. Each line: method, seeds, seed spread (x image SE), coverage of
0 by the 95 % interval over the trials, and its Monte Carlo standard error.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from defectfusion.analysis.bootstrap import (
    INTERVALS,
    SetMetrics,
    hierarchical_diff,
    image_replicates,
    seed_replicates,
)

SPREADS = (0.5, 1.0, 2.0, 5.0)  # seed SD as a multiple of the image standard error


def simulate_coverage(
    method: str,
    n_seeds: int,
    spread: float,
    trials: int,
    n_images: int = 200,
    n_boot: int = 500,
    seed: int = 0,
) -> float:
    """The fraction of `trials` whose interval covers the true difference (0)."""
    rng = np.random.default_rng([seed, n_seeds, int(spread * 100)])
    image_se = math.sqrt((1.0 + 1.0 / n_seeds) / n_images)
    hits = 0
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
        lo, hi = hierarchical_diff(sets, ref, idx, "m", method=method)["ci"]
        hits += lo <= 0.0 <= hi
    return hits / trials


def _metric(x: np.ndarray, counts: np.ndarray) -> SetMetrics:
    """A mean-of-images metric on the full split and on every image replicate."""
    return SetMetrics({"m": float(x.mean())}, {"m": counts @ x / len(x)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 5, 8])
    ap.add_argument("--n-boot", type=int, default=500)
    args = ap.parse_args(argv)
    print(f"{'method':>10s} {'seeds':>5s} {'spread':>6s} {'coverage':>8s} {'mc_se':>6s}")
    start = time.perf_counter()
    for method in INTERVALS:
        for s in args.seeds:
            for spread in SPREADS:
                cov = simulate_coverage(method, s, spread, args.trials, n_boot=args.n_boot)
                mc = math.sqrt(cov * (1 - cov) / args.trials)
                print(f"{method:>10s} {s:5d} {spread:5.1f}x {cov:8.3f} {mc:6.3f}", flush=True)
    print(f"# {args.trials} trials per line, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
