"""Where a finished run's time went: wall, CPU and jobs per rule, and the critical path.

    python benchmarks/run_times.py RUN_DIR [--graph docs/rulegraph.dot]

Reads RUN_DIR/benchmarks/results/*.tsv, Snakemake's `benchmark:` file of every job (``s``:
wall seconds, ``cpu_time``: CPU seconds, the job's processes together). A file's name starts
with its rule (``phase2_zero_start_seed0.tsv``: rule phase2). Printed:

- per rule: jobs, wall seconds summed over its jobs, the longest job, CPU seconds, CPU/wall;
- end to end: from the first job's start (its file's time minus its wall time) to the last
  job's end (the newest file's time): what the run took on the clock;
- the critical path: the chain of rules through the rule graph (docs/rulegraph.dot, the
  Snakefile's) whose longest jobs add up to the most. With enough cores every other job runs
  beside it, so no schedule finishes sooner; its share of the end-to-end time says how much
  a better schedule could still gain.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Longest first: "evaluate_phase1_..." is evaluate_phase1's, not phase1's.
RULES = (
    "evaluate_phase1", "evaluate_phase2", "report_table", "report_figure", "report_summary",
    "text_embed", "postmortem", "phase1", "phase2", "compare", "data", "book",
)  # fmt: skip
# benchmark file prefix -> the rule's name in the rule graph
GRAPH_NAME = {"report_table": "table", "report_figure": "figure", "report_summary": "summary"}


def rule_of(name: str) -> str | None:
    return next((r for r in RULES if name == r or name.startswith(r + "_")), None)


def read_jobs(folder: Path) -> list[dict]:
    """One record per benchmark file: rule, wall and CPU seconds, end time."""
    jobs = []
    for path in sorted(folder.glob("*.tsv")):
        with path.open(encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        rule = rule_of(path.stem)
        if not rows or rule is None:
            continue
        wall = float(rows[-1]["s"])
        cpu = float(rows[-1].get("cpu_time") or 0.0)
        jobs.append({"rule": rule, "file": path.name, "wall": wall, "cpu": cpu,
                     "end": path.stat().st_mtime})  # fmt: skip
    return jobs


def critical_path(longest: dict[str, float], edges: list[tuple[str, str]]) -> list[str]:
    """The heaviest chain of rules (weights: each rule's longest job) through the DAG."""
    nodes = set(longest) | {n for e in edges for n in e}
    ups = defaultdict(list)
    for a, b in edges:
        ups[b].append(a)
    best: dict[str, tuple[float, list[str]]] = {}

    def visit(n: str) -> tuple[float, list[str]]:
        if n not in best:
            prev = max((visit(u) for u in ups[n]), default=(0.0, []), key=lambda x: x[0])
            best[n] = (prev[0] + longest.get(n, 0.0), [*prev[1], n])
        return best[n]

    return max((visit(n) for n in nodes), key=lambda x: x[0])[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--graph", type=Path, default=ROOT / "docs/rulegraph.dot")
    args = ap.parse_args(argv)
    folder = args.run_dir / "benchmarks/results"
    jobs = read_jobs(folder)
    if not jobs:
        print(f"run_times: no benchmark files under {folder}", file=sys.stderr)
        return 2
    per: dict[str, dict] = defaultdict(lambda: {"n": 0, "wall": 0.0, "max": 0.0, "cpu": 0.0})
    for j in jobs:
        p = per[j["rule"]]
        p["n"] += 1
        p["wall"] += j["wall"]
        p["max"] = max(p["max"], j["wall"])
        p["cpu"] += j["cpu"]
    print(
        f"{'rule':18s} {'jobs':>5s} {'wall_s':>9s} {'longest_s':>9s} {'cpu_s':>9s} {'cpu/wall':>8s}"
    )
    for rule, p in sorted(per.items(), key=lambda kv: -kv[1]["wall"]):
        ratio = p["cpu"] / p["wall"] if p["wall"] else 0.0
        print(
            f"{rule:18s} {p['n']:5d} {p['wall']:9.0f} {p['max']:9.0f} {p['cpu']:9.0f} {ratio:8.2f}"
        )
    total_wall = sum(p["wall"] for p in per.values())
    total_cpu = sum(p["cpu"] for p in per.values())
    start = min(j["end"] - j["wall"] for j in jobs)
    end = max(j["end"] for j in jobs)
    print(f"{'all jobs':18s} {len(jobs):5d} {total_wall:9.0f} {'':9s} {total_cpu:9.0f}")
    print(f"end to end: {end - start:.0f} s ({(end - start) / 60:.1f} min) on the clock")
    if args.graph.is_file():
        sys.path.insert(0, str(ROOT / "code"))
        from defectfusion.workflow.rulegraph import rulegraph_edges

        _, edges = rulegraph_edges(args.graph.read_text(encoding="utf-8"))
        longest = {GRAPH_NAME.get(r, r): p["max"] for r, p in per.items()}
        path = [n for n in critical_path(longest, edges) if n in longest]
        length = sum(longest[n] for n in path)
        print(f"critical path: {' -> '.join(path)}: {length:.0f} s "
              f"({100 * length / max(end - start, 1e-9):.0f} % of end to end)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
