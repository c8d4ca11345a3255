"""Speed and memory of each detector preset on this machine, as a Markdown table.

For each preset, at its default input size (or ``--size``), a fresh Python process builds
the model and measures:

- seconds per training step: the median over ``--steps`` steps after ``--warmup`` (a real
  forward with random boxes and labels, the Phase 1 loss, backward, gradient clipping and an
  AdamW step, with frozen parts handled as in training);
- seconds per evaluated image: the median eval batch time (forward + post-processing into
  COCO detections) divided by the batch size;
- peak memory: the process's peak resident set (``getrusage`` maxrss), and its growth over
  the baseline after imports. One process per preset, because maxrss never goes down.

    python benchmarks/bench_presets.py                      # every preset, default sizes
    python benchmarks/bench_presets.py --presets deimv2-dinov3-tiny --size 256 --steps 20

Large presets at 640 px take tens of seconds per step on a laptop CPU: they get fewer steps
by default. Timings are wall-clock and depend on the load of the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

CLASS_NAMES = ["normal", "perforation", "fracture", "scratch", "dent", "contamination"]


def is_tiny(preset: str) -> bool:
    return preset.endswith("-tiny")


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def random_labels(batch: int, n_classes: int, gen: Any) -> list[dict[str, Any]]:
    """1-5 boxes per image, normalised (cx, cy, w, h) kept inside the image."""
    import torch

    labels = []
    for _ in range(batch):
        n = int(torch.randint(1, 6, (), generator=gen))
        wh = 0.05 + 0.3 * torch.rand(n, 2, generator=gen)
        c = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=gen)
        labels.append(
            {
                "class_labels": torch.randint(0, n_classes, (n,), generator=gen),
                "boxes": torch.cat([c, wh], dim=1),
            }
        )
    return labels


def measure(
    preset: str, size: int, batch: int, steps: int, warmup: int, eval_batches: int, threads: int
) -> dict[str, Any]:
    """Runs in its own process (see `main`); returns one table row."""
    import torch

    from defectfusion.evaluation.evaluate import postprocess
    from defectfusion.model.losses import install_loss
    from defectfusion.model.models import build_model, count_parameters, set_train_mode
    from defectfusion.train.common import param_groups

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    base = maxrss_mib()

    model = build_model(preset, CLASS_NAMES)
    install_loss(model, "mal")
    optimizer = torch.optim.AdamW(param_groups(model, 1e-4, 0.1, 1e-4), lr=1e-4)
    set_train_mode(model, True)
    train_times = []
    for _ in range(warmup + steps):
        x = torch.randn(batch, 3, size, size, generator=gen)
        labels = random_labels(batch, len(CLASS_NAMES), gen)
        t0 = time.perf_counter()
        out = model(pixel_values=x, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_times.append(time.perf_counter() - t0)

    set_train_mode(model, False)
    eval_times = []
    with torch.no_grad():
        for _ in range(1 + eval_batches):  # one warm-up batch
            x = torch.randn(batch, 3, size, size, generator=gen)
            t0 = time.perf_counter()
            out = model(pixel_values=x)
            postprocess(out.logits, out.pred_boxes, [(size, size)] * batch)
            eval_times.append(time.perf_counter() - t0)

    peak = maxrss_mib()
    return {
        "preset": preset,
        "size": size,
        "batch": batch,
        "params_m": count_parameters(model) / 1e6,
        "train_step_s": statistics.median(train_times[warmup:]),
        "train_steps": steps,
        "eval_image_s": statistics.median(eval_times[1:]) / batch,
        "peak_rss_mib": peak,
        "delta_rss_mib": peak - base,
        "threads": threads,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| preset | input | batch | params | s / train step (median, n) | s / eval image "
        "| peak RSS | RSS over imports |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['preset']} | {r['size']} | {r['batch']} | failed: {r['error']} | | | | |"
            )
            continue
        lines.append(
            f"| {r['preset']} | {r['size']} | {r['batch']} | {r['params_m']:.2f} M "
            f"| {r['train_step_s']:.3f} ({r['train_steps']}) | {r['eval_image_s']:.3f} "
            f"| {r['peak_rss_mib']:.0f} MiB | {r['delta_rss_mib']:.0f} MiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from defectfusion.model.models import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS), metavar="PRESET"
    )
    p.add_argument(
        "--size", type=int, help="input side for every preset (default: each preset's own)"
    )
    p.add_argument(
        "--batch", type=int, help="batch size (default: 4 for *-tiny presets, 2 for the others)"
    )
    p.add_argument("--steps", type=int, help="timed training steps (default: 10 tiny, 3 large)")
    p.add_argument(
        "--warmup", type=int, help="untimed training steps first (default: 2 tiny, 1 large)"
    )
    p.add_argument("--eval-batches", type=int, help="timed eval batches (default: 5 tiny, 2 large)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines too")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one preset, print JSON
    a = p.parse_args(argv)

    if a.worker:
        row = measure(a.worker, a.size, a.batch, a.steps, a.warmup, a.eval_batches, a.threads)
        print(json.dumps(row))
        return 0

    import torch

    threads = a.threads or torch.get_num_threads()
    rows = []
    for preset in a.presets:
        tiny = is_tiny(preset)
        args = [
            "--worker", preset,
            "--size", str(a.size or PRESETS[preset].image_size),
            "--batch", str(a.batch or (4 if tiny else 2)),
            "--steps", str(a.steps or (10 if tiny else 3)),
            "--warmup", str(a.warmup if a.warmup is not None else (2 if tiny else 1)),
            "--eval-batches", str(a.eval_batches or (5 if tiny else 2)),
            "--threads", str(threads),
        ]  # fmt: skip
        print(f"benchmarking {preset} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
        if proc.returncode:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"preset": preset, "size": args[3], "batch": args[5], "error": tail})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if a.json:
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{threads} torch thread(s), {sys.platform}, torch {torch.__version__}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
