"""A Phase 2 training step and evaluation against Phase 1's: same preset, size and batch.

Three modes, in one process and interleaved step by step (machine load that comes and goes
then slows every mode alike, so the ratios hold on a shared machine):

- ``phase1``: every parameter trains (forward, backward through the whole detector, AdamW);
- ``phase2``: the fusion and the class heads train; the frozen backbone and hybrid encoder
  still run forward on every step (the uncached path, what ``fusion.bn=train`` runs);
- ``phase2_cached``: the frozen part's output comes from `defectfusion.model.cache` (packed
  features computed once before the timed steps, as a Phase 2 run reads them from disk);
  the decoder, matcher and loss still run live.

Per mode: seconds per training step (median), evaluation seconds per image (forward in eval
mode, median batch / batch size), and where a step's time goes (backbone, encoder, decoder,
loss, backward + optimiser). Goals (issue 12): cached step ratio <= 0.15, cached evaluation
<= 0.3 of Phase 1's per image.

    python benchmarks/bench_phase2.py --threads 1 --steps 10      # tiny preset, 192 px, batch 4
    python benchmarks/bench_phase2.py --preset deimv2-dinov3-m --size 256 --batch 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

from bench_presets import CLASS_NAMES, random_labels

MODES = ("phase1", "phase2", "phase2_cached")


def _timers(model, acc: dict[str, float]) -> None:
    """Accumulate the wall time of the detector's parts with forward hooks."""
    base = model.model
    parts = {"backbone": base.conv_encoder, "encoder": base.encoder, "decoder": base.decoder}
    for name, mod in parts.items():
        start: dict[str, float] = {}

        def pre(*_a, _s=start):
            _s["t"] = time.perf_counter()

        def post(*_a, _s=start, _n=name):
            acc[_n] += time.perf_counter() - _s["t"]

        mod.register_forward_pre_hook(pre)
        mod.register_forward_hook(post)
    loss_fn = model.loss_function

    def timed_loss(*a, **k):
        t = time.perf_counter()
        out = loss_fn(*a, **k)
        acc["loss (matcher + terms)"] += time.perf_counter() - t
        return out

    model.loss_function = timed_loss


def build(mode: str, preset: str, size: int, batch: int, n: int):
    """One mode's model, optimiser and inputs (the same images and boxes in every mode)."""
    import torch

    from defectfusion.model import cache
    from defectfusion.model.fusion import attach_fusion, set_trainable
    from defectfusion.model.losses import install_loss
    from defectfusion.model.models import build_model
    from defectfusion.train.common import param_groups

    torch.manual_seed(0)
    model = build_model(preset, CLASS_NAMES)
    if mode == "phase1":
        install_loss(model, "mal")
        lr = 1e-3
    else:
        attach_fusion(model, torch.randn(len(CLASS_NAMES), 512), "zero_start")
        set_trainable(model)
        install_loss(model, "focal")
        lr = 5e-5
    opt = torch.optim.AdamW(param_groups(model, lr, 1.0, 1e-4), lr=lr)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(batch, 3, size, size, generator=gen) for _ in range(n)]
    labels = [random_labels(batch, len(CLASS_NAMES), gen) for _ in range(n)]
    if mode == "phase2_cached":  # what a run reads from its cache (built once, not timed)
        model.eval()
        with torch.no_grad():
            packed = [cache.pack(cache.frozen_features(model, x)) for x in inputs]
        cache.install(model, packed[0][1])
        inputs = [p for p, _ in packed]
    return model, opt, inputs, labels


def run(
    preset: str, size: int, batch: int, steps: int, warmup: int, threads: int
) -> dict[str, dict]:
    """All modes in one process, interleaved step by step: on a shared machine, load that
    comes and goes then slows every mode alike, and the ratios stay meaningful."""
    import torch

    from defectfusion.model.models import count_parameters, set_train_mode

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    n = warmup + steps
    built = {m: build(m, preset, size, batch, n) for m in MODES}
    acc = {m: defaultdict(float) for m in MODES}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for m, (model, *_rest) in built.items():
        _timers(model, acc[m])
        set_train_mode(model, True)
    for i in range(n):
        for m, (model, opt, inputs, labels) in built.items():
            if i == warmup:
                acc[m].clear()
            t = time.perf_counter()
            out = model(pixel_values=inputs[i], labels=labels[i])
            t_fwd = time.perf_counter()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.1)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                end = time.perf_counter()
                times[m].append(end - t)
                acc[m]["backward + optimiser"] += end - t_fwd
    # The step's parts, before the evaluation below adds its own forwards to the timers.
    parts = {m: {k: v / steps for k, v in acc[m].items()} for m in MODES}
    eval_times: dict[str, list[float]] = {m: [] for m in MODES}
    for _m, (model, *_rest) in built.items():
        model.eval()
    with torch.no_grad():
        for i in range(min(n, warmup + max(3, steps // 2))):
            for m, (model, _opt, inputs, _labels) in built.items():
                t = time.perf_counter()
                model(pixel_values=inputs[i])
                if i >= warmup:
                    eval_times[m].append(time.perf_counter() - t)
    rows = {}
    for m, (model, *_rest) in built.items():
        breakdown = parts[m]
        breakdown["rest of forward"] = sum(times[m]) / steps - sum(breakdown.values())
        rows[m] = {
            "mode": m,
            "trainable": count_parameters(model, trainable_only=True),
            "s_per_step": statistics.median(times[m]),
            "eval_s_per_image": statistics.median(eval_times[m]) / batch,
            "breakdown": breakdown,
        }
    return rows


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
    a = ap.parse_args()
    rows = run(a.preset, a.size, a.batch, a.steps, a.warmup, a.threads)
    print(
        f"{a.preset} at {a.size} px, batch {a.batch}, {a.threads} threads, median of {a.steps} steps\n"
    )
    print("| mode | trainable params | s / step | eval s / image |")
    print("|---|---:|---:|---:|")
    for r in rows.values():
        print(
            f"| {r['mode']} | {r['trainable']:,} | {r['s_per_step']:.4f} | "
            f"{r['eval_s_per_image']:.4f} |"
        )
    print("\nWhere a step's time goes (mean seconds per step):\n")
    parts = sorted({k for r in rows.values() for k in r["breakdown"]})
    print("| part | " + " | ".join(rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for part in parts:
        cells = " | ".join(f"{r['breakdown'].get(part, 0.0):.4f}" for r in rows.values())
        print(f"| {part} | {cells} |")
    p1 = rows["phase1"]
    print()
    for mode, label in (("phase2", "uncached"), ("phase2_cached", "cached")):
        r = rows[mode]
        print(f"phase2/phase1 step ratio: {r['s_per_step'] / p1['s_per_step']:.3f} ({label})")
    for mode, label in (("phase2", "uncached"), ("phase2_cached", "cached")):
        r = rows[mode]
        ratio = r["eval_s_per_image"] / p1["eval_s_per_image"]
        print(f"phase2/phase1 eval per image ratio: {ratio:.3f} ({label})")
    print("goals: cached step ratio <= 0.15, cached eval per image ratio <= 0.3")


if __name__ == "__main__":
    main()
