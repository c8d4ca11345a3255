"""A Phase 2 training step against a Phase 1 step: same preset, size and batch, one run.

Phase 1 trains every parameter (forward, backward through the whole detector, AdamW).
Phase 2 trains only the fusion and the class heads: the frozen backbone, encoder and
decoder still run forward, but autograd records nothing there, so the backward is tiny.
The goal is a Phase 2 step at most 0.35 of a Phase 1 step. Each mode runs in its own
process so that its peak memory (getrusage maxrss) is its own.

    python benchmarks/bench_phase2.py                       # tiny preset, 192 px, batch 4
    python benchmarks/bench_phase2.py --preset deimv2-dinov3-m --size 256 --batch 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from bench_presets import CLASS_NAMES, maxrss_mib, random_labels


def worker(
    mode: str, preset: str, size: int, batch: int, steps: int, warmup: int, threads: int
) -> dict:
    import torch

    from defectfusion.fusion import attach_fusion, set_trainable
    from defectfusion.losses import install_loss
    from defectfusion.models import build_model, count_parameters, set_train_mode
    from defectfusion.train.phase1 import param_groups

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    base_rss = maxrss_mib()
    model = build_model(preset, CLASS_NAMES)
    if mode == "phase2":
        attach_fusion(model, torch.randn(len(CLASS_NAMES), 512), "zero_start")
        set_trainable(model)
        install_loss(model, "focal")
        lr = 5e-5
    else:
        install_loss(model, "mal")
        lr = 1e-3
    opt = torch.optim.AdamW(param_groups(model, lr, 1.0, 1e-4), lr=lr)
    set_train_mode(model, True)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + steps):
        x = torch.randn(batch, 3, size, size, generator=gen)
        labels = random_labels(batch, len(CLASS_NAMES), gen)
        t = time.perf_counter()
        out = model(pixel_values=x, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {
        "mode": mode,
        "trainable": count_parameters(model, trainable_only=True),
        "s_per_step": statistics.median(times),
        "peak_rss_mib": maxrss_mib(),
        "rss_growth_mib": maxrss_mib() - base_rss,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="deimv2-dinov3-tiny")
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", choices=["phase1", "phase2"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    args = [a.preset, a.size, a.batch, a.steps, a.warmup, a.threads]
    if a.worker:
        print(json.dumps(worker(a.worker, *args)))
        return
    rows = {}
    for mode in ("phase1", "phase2"):
        cmd = [sys.executable, __file__, "--worker", mode, "--preset", a.preset, "--size", str(a.size),
               "--batch", str(a.batch), "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--threads", str(a.threads)]  # fmt: skip
        rows[mode] = json.loads(
            subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
        )
    print(
        f"{a.preset} at {a.size} px, batch {a.batch}, {a.threads} threads, median of {a.steps} steps\n"
    )
    print("| step | trainable params | s / step | peak RSS MiB | RSS growth MiB |")
    print("|---|---:|---:|---:|---:|")
    for r in rows.values():
        print(
            f"| {r['mode']} | {r['trainable']:,} | {r['s_per_step']:.4f} | {r['peak_rss_mib']:.0f} | {r['rss_growth_mib']:.0f} |"
        )
    ratio = rows["phase2"]["s_per_step"] / rows["phase1"]["s_per_step"]
    print(f"\nPhase 2 / Phase 1 step time: {ratio:.3f} (goal: <= 0.35)")


if __name__ == "__main__":
    main()
