"""Coverage of the post-mortem's intervals at the seed counts a run may have.

    python benchmarks/bench_coverage.py [--trials 1000] [--seeds 3 5 8]

The simulation is `defectfusion.analysis.coverage` (its docstring states the model); the
post-mortem runs it at its own run's design and the book quotes that. This prints both
interval methods at several seed counts. Each line: method, seeds, seed spread (x image SE),
coverage of 0 by the 95 % interval over the trials, and its Monte Carlo standard error.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from defectfusion.analysis.bootstrap import INTERVALS
from defectfusion.analysis.coverage import SPREADS, simulate_coverage


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
                cov = simulate_coverage(method, s, spread, args.trials, n_boot=args.n_boot)[95.0]
                mc = math.sqrt(cov * (1 - cov) / args.trials)
                print(f"{method:>10s} {s:5d} {spread:5.1f}x {cov:8.3f} {mc:6.3f}", flush=True)
    print(f"# {args.trials} trials per line, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
