"""The GPU check: what a user needs to trust the GPU path, in one run of under 10 minutes.

On one GPU, with the NEU profile (configs/neu.yaml: the faithful DEIMv2-S at 224 px, batch 16,
AMP on): Phase 1 for a few epochs (train images/s and peak GPU memory at the profile's batch
size, val mAP per epoch), then one Phase 2 run on that checkpoint (its step time against
Phase 1's). Prints one block of figures; writes them to OUT/gpu_check.json.

    python benchmarks/gpu_check.py --neu /path/to/NEU-DET            # on the GPU machine
    python benchmarks/gpu_check.py --toy                              # CPU, toy size (CI)

The GPU machine has no internet: the text encoder is the offline MiniLM (the step time does
not depend on which frozen embeddings the fusion reads). ``--toy`` runs the same code on the
CPU with a few generated NEU-format images at 128 px, one epoch each, so the script cannot
rot (tests/test_profiles.py runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _history(run: Path) -> list[dict]:
    lines = (run / "history.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("epoch", 0) >= 1]


def _peak_memory_mb(cuda: bool) -> float:
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--neu", help="the NEU-DET folder (VOC or YOLO layout)")
    ap.add_argument("--toy", action="store_true", help="CPU, generated images, one epoch")
    ap.add_argument("--epochs", type=int, default=4, help="Phase 1 epochs (default 4)")
    ap.add_argument("--out", default="/tmp/gpu_check")
    args = ap.parse_args()

    import torch

    from defectfusion.config import load_config
    from defectfusion.core.errors import UserError
    from defectfusion.data import prepare
    from defectfusion.train.phase1 import train_phase1
    from defectfusion.train.phase2 import train_phase2

    cuda = torch.cuda.is_available()
    if not cuda and not args.toy:
        print("gpu_check: no CUDA device visible (run it on the GPU machine, or --toy)",
              file=sys.stderr)  # fmt: skip
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = args.neu
    if args.toy:
        sys.path.insert(0, str(ROOT / "tests"))
        from defectfusion.data.importers import NEU_CLASSES
        from standins import tiny_neu

        src = str(out / "neu_src")
        if not Path(src).is_dir():
            tiny_neu(Path(src), list(NEU_CLASSES))
    if not src or not Path(src).is_dir():
        print(f"gpu_check: --neu {src!r} is not a folder", file=sys.stderr)
        return 2
    sets = [f"data.dir={out / 'data'}", "pipeline.dataset.kind=neu",
            f"pipeline.dataset.src={src}", "text.encoder=minilm", "text.weights=null",
            f"phase1.epochs={1 if args.toy else args.epochs}", "phase1.patience=0",
            "phase2.epochs=1", "phase2.patience=0"]  # fmt: skip
    if args.toy:
        sets += ["data.image_size=128", "phase1.batch_size=4", "phase2.batch_size=4",
                 "phase1.warmup_steps=2"]  # fmt: skip
    files = [ROOT / "params.yaml", ROOT / "configs" / "neu.yaml"]
    try:
        cfg = load_config(files, sets)
        if not (out / "data" / "annotations" / "val.json").is_file():
            prepare(dataclasses.asdict(cfg.pipeline.dataset), cfg.data.image_size, out / "data")
        p1 = out / "phase1"
        start = time.perf_counter()
        train_phase1(cfg, p1, restart=True)
        p1_wall = time.perf_counter() - start
        p1_memory = _peak_memory_mb(cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        cfg2 = load_config(files, sets, variant="zero_start")
        start = time.perf_counter()
        train_phase2(cfg2, p1 / "best.pt", out / "phase2", restart=True)
        p2_wall = time.perf_counter() - start
        p2_memory = _peak_memory_mb(cuda)
    except UserError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    h1, h2 = _history(p1), _history(out / "phase2")
    n_train = len(json.loads((out / "data" / "annotations" / "train.json").read_text())["images"])
    step1 = [r["seconds"] / max(1, r["step"] - (h1[i - 1]["step"] if i else 0))
             for i, r in enumerate(h1)]  # fmt: skip
    step2 = [r["seconds"] / max(1, r["step"] - (h2[i - 1]["step"] if i else 0))
             for i, r in enumerate(h2)]  # fmt: skip
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (toy)",
        "amp": bool(cfg.phase1.amp and cuda),  # bfloat16 autocast on CUDA only
        "preset": cfg.model.preset,
        "image_size": cfg.data.image_size,
        "batch_size": cfg.phase1.batch_size,
        "n_train": n_train,
        "phase1": {"wall_s": p1_wall, "peak_memory_mb": p1_memory,
                   "images_per_s": [n_train / r["seconds"] for r in h1],
                   "val_map": [r.get("val_map") for r in h1], "step_s": step1},  # fmt: skip
        "phase2": {"wall_s": p2_wall, "peak_memory_mb": p2_memory, "step_s": step2,
                   "val_map": [r.get("val_map") for r in h2]},  # fmt: skip
    }
    report["phase2_step_over_phase1"] = (
        min(step2) / min(step1) if step1 and step2 and min(step1) > 0 else None
    )
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(f"device {report['device']}  AMP {'on (bfloat16)' if report['amp'] else 'off'}  "
          f"preset {report['preset']} at {report['image_size']} px, batch {report['batch_size']}")  # fmt: skip
    for i, r in enumerate(h1):
        print(f"phase1 epoch {r['epoch']:3d}  {n_train / r['seconds']:8.1f} train images/s  "
              f"step {step1[i]:.3f} s  val mAP {r.get('val_map') or float('nan'):.4f}")  # fmt: skip
    print(f"phase1 peak memory {p1_memory:,.0f} MiB ({'GPU' if cuda else 'process RSS'})")
    for i, r in enumerate(h2):
        print(f"phase2 epoch {r['epoch']:3d}  step {step2[i]:.3f} s  "
              f"val mAP {r.get('val_map') or float('nan'):.4f}")  # fmt: skip
    ratio = report["phase2_step_over_phase1"]
    print(f"phase2 step / phase1 step: {ratio:.2f}" if ratio else "phase2 step ratio: n/a")
    print(f"wall: phase1 {p1_wall:.0f} s, phase2 {p2_wall:.0f} s -> {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
