"""Does a Phase 1 recipe tuned on the synthetic set also hold on real data?

Trains the default CPU recipe's Phase 1 (params.yaml: the tiny preset at 192 px) on the
shared NEU-DET images twice, for the same number of epochs (the same CPU minutes): once with
the recipe before a change (``--before KEY=VALUE ...``) and once after it (``--after``), and
prints each run's val mAP at the last epoch finished within each time mark (default 5 and 15
minutes of training, from the history's per-epoch seconds). Run it alone: on 2 cores any
second process slows torch several-fold.

    python benchmarks/neu_recipe_check.py --epochs 14 \\
        --before phase1.final_fraction=0.0 phase1.ema_warmup_steps=2000 \\
        --after phase1.final_fraction=0.2 phase1.ema_warmup_steps=1000

Writes under --work (default /tmp/neu_recipe_check): the prepared dataset, one run folder
per recipe, and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

NEU = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "neu-det"


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def at_marks(history: Path, marks: list[float]) -> list[dict]:
    """Per mark (minutes): the last epoch whose cumulative training seconds fit, its val mAP."""
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("epoch", 0) >= 1]
    out, elapsed, fitted = [], 0.0, []
    for r in rows:
        elapsed += r.get("seconds", 0.0)
        fitted.append((elapsed, r))
    for m in marks:
        within = [(t, r) for t, r in fitted if t <= m * 60.0 * 1.05]  # 5 % slack: epoch grain
        t, r = within[-1] if within else (None, None)
        out.append({"minutes": m, "epoch": r and r["epoch"], "seconds": t,
                    "val_map": r and r.get("val_map")})  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", default=str(NEU), help="the NEU-DET folder")
    ap.add_argument("--work", default="/tmp/neu_recipe_check")
    ap.add_argument("--epochs", type=int, required=True, help="epochs of both runs")
    ap.add_argument("--marks", type=float, nargs="+", default=[5.0, 15.0], help="minutes")
    ap.add_argument("--before", nargs="*", default=[], help="KEY=VALUE of the old recipe")
    ap.add_argument("--after", nargs="*", default=[], help="KEY=VALUE of the new recipe")
    args = ap.parse_args()
    if not Path(args.src).is_dir():
        print(f"{args.src}: no NEU-DET folder (pass --src)", file=sys.stderr)
        return 2
    work = Path(args.work)
    data = work / "data"
    # NEU's labels on the default CPU recipe: its critical classes, everything else params.yaml
    common = ["--set", f"data.dir={data}", "--set", "data.critical_classes=[0, 5, 1]",
              "--set", "pipeline.dataset.kind=neu", "--set", f"pipeline.dataset.src={args.src}",
              "--set", f"phase1.epochs={args.epochs}", "--set", "phase1.max_epochs=0"]  # fmt: skip
    if not (data / "annotations" / "val.json").is_file():
        run(["defectfusion", "data", "prepare", "--config", "params.yaml", *common,
             "--out", str(data)])  # fmt: skip
    summary = {"epochs": args.epochs, "marks": args.marks, "runs": {}}
    for name, sets in (("before", args.before), ("after", args.after)):
        out = work / name
        if not (out / "history.jsonl").is_file() or not (out / "best.pt").is_file():
            extra = [x for kv in sets for x in ("--set", kv)]
            run(["defectfusion", "train", "phase1", "--config", "params.yaml", *common, *extra,
                 "--out", str(out), "--restart"])  # fmt: skip
        summary["runs"][name] = {"sets": sets, "marks": at_marks(out / "history.jsonl", args.marks)}
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nNEU-DET, tiny preset at 192 px, {args.epochs} epochs each")
    print(f"{'recipe':8} " + " ".join(f"{m:>5g} min (epoch, val mAP)" for m in args.marks))
    for name, r in summary["runs"].items():
        cells = [f"{'':>5}{c['epoch'] or '-':>6}, {c['val_map'] or float('nan'):.4f}    "
                 for c in r["marks"]]  # fmt: skip
        print(f"{name:8} " + " ".join(cells))
    # Epoch for epoch too: on a shared machine the same epochs can take different seconds,
    # and a time mark then picks different epochs of identical curves.
    curves = {n: [json.loads(x) for x in (work / n / "history.jsonl").read_text().splitlines()]
              for n in summary["runs"]}  # fmt: skip
    print("\nval mAP per epoch")
    for name, rows in curves.items():
        print(f"{name:8} " + " ".join(f"{r.get('val_map') or 0:.4f}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
