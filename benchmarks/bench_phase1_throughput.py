"""Phase 1 training images per second on the default tiny preset: the recipe as it is, and
the options that leave the model alone, in one run.

Each option trains ``--steps`` real steps (the project's loader with its augmentations,
forward, MAL loss, backward, clipping, AdamW), after ``--warmup`` steps; the options run in
rounds (A B C ... A B C ...) so that load on a shared machine spreads over all of them, and
the median rate per option is printed. Options:

- ``baseline``: params.yaml's Phase 1 (batch 4, loader in the main process, plain
  ``v2.ColorJitter``), what the issue measured;
- ``grey_jitter``: the loader's `GreyAwareColorJitter` (skips saturation and hue on grey
  images; on a colour dataset it changes nothing) on grey copies of the images (NEU-DET);
- ``grey_baseline``: the same grey images with the plain jitter, its reference;
- ``batch8`` / ``batch16``: larger batches (the lr is scaled with them in a real recipe);
- ``workers1``: one loader worker process, overlapping loading with the step;
- ``channels_last``: the model and inputs in channels-last memory format;
- ``bf16``: bfloat16 autocast on the CPU.

It also prints the seconds a validation pass over ``--val`` images takes next to the
seconds of one training epoch, which is what validating every k epochs or on a subset saves.

    python benchmarks/bench_phase1_throughput.py --steps 10 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

OPTIONS = (
    "baseline",
    "grey_baseline",
    "grey_jitter",
    "batch8",
    "batch16",
    "workers1",
    "channels_last",
    "bf16",
)


def make_data(root: Path, n: int, size: int, grey: bool) -> Path:
    """A synth split of `n` images (grey copies: every pixel's R = G = B)."""
    from PIL import Image

    from defectfusion.data import coco
    from defectfusion.data.synth import SynthSpec, generate

    generate(root, SynthSpec(n_train=n, n_val=4, n_test=4, image_size=size))
    if grey:
        for png in (root / "images").rglob("*.png"):
            with Image.open(png) as im:
                im.convert("L").convert("RGB").save(png)
    return coco.split_path(root, "train")


def loader_for(option: str, split: Path, size: int, batch: int, seed: int) -> Any:
    from torchvision.transforms import v2

    from defectfusion.data import loader as L

    workers = 1 if option == "workers1" else 0
    ld = L.make_loader(split, size, batch, train=True, num_workers=workers, seed=seed)
    if option in ("baseline", "grey_baseline"):  # the jitter as it was
        ds = ld.dataset
        ds.photometric = v2.RandomApply(
            [v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)],
            p=ds.augment.photometric,
        )
    return ld


def measure(
    option: str, model: Any, split: Path, size: int, steps: int, warmup: int, seed: int
) -> float:
    """Training images per second of one option (after `warmup` steps)."""
    import torch

    from defectfusion.model.models import set_train_mode
    from defectfusion.train.common import param_groups

    batch = {"batch8": 8, "batch16": 16}.get(option, 4)
    ld = loader_for(option, split, size, batch, seed)
    opt = torch.optim.AdamW(param_groups(model, 1e-3, 1.0, 1e-4), lr=1e-3)
    set_train_mode(model, True)
    if option == "channels_last":
        model.to(memory_format=torch.channels_last)
    amp = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if option == "bf16"
        else contextlib.nullcontext()
    )
    images, t0 = 0, None
    it = iter(ld)
    for i in range(warmup + steps):
        if i == warmup:
            t0, images = time.perf_counter(), 0
        try:
            x, targets = next(it)
        except StopIteration:
            it = iter(ld)
            x, targets = next(it)
        if option == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        labels = [{"class_labels": t["class_labels"], "boxes": t["boxes"]} for t in targets]
        with amp:
            out = model(pixel_values=x, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        images += len(x)
    assert t0 is not None
    rate = images / (time.perf_counter() - t0)
    if option == "channels_last":
        model.to(memory_format=torch.contiguous_format)
    return rate


def val_seconds(model: Any, split: Path, size: int, n_val: int) -> float:
    from defectfusion.data.loader import make_loader
    from defectfusion.evaluation.evaluate import predict

    ld = make_loader(split, size, 16, train=False)
    t = time.perf_counter()
    done = 0
    for x, targets in ld:
        predict(model, [(x, targets)], progress=False)
        done += len(x)
        if done >= n_val:
            break
    return (time.perf_counter() - t) * n_val / done


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="deimv2-dinov3-tiny")
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=64, help="synth training images to make")
    ap.add_argument("--train", type=int, default=800, help="epoch size for the val share")
    ap.add_argument("--val", type=int, default=200, help="val images per validation pass")
    ap.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    a = ap.parse_args()

    import torch

    from defectfusion.model.losses import install_loss
    from defectfusion.model.models import build_model

    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)  # as the training engine does on CPU
    tmp = Path(tempfile.mkdtemp(prefix="bench_phase1_"))
    colour = make_data(tmp / "colour", a.images, a.size, grey=False)
    grey = make_data(tmp / "grey", a.images, a.size, grey=True)
    names = ["normal", "perforation", "fracture", "scratch", "dent", "contamination"]
    torch.manual_seed(0)
    model = build_model(a.preset, names)
    install_loss(model, "mal")
    rates: dict[str, list[float]] = {o: [] for o in a.options}
    for r in range(a.rounds):
        for o in a.options:
            split = grey if o.startswith("grey") else colour
            rates[o].append(measure(o, model, split, a.size, a.steps, a.warmup, seed=r))
    print(f"{a.preset} at {a.size} px, {a.threads} thread(s), {a.steps} steps x {a.rounds} rounds")
    print("(wall clock: on a shared machine the ratios, not the rates, carry over)\n")
    print("| option | images/s (median) | vs baseline |")
    print("|---|---:|---:|")
    base = statistics.median(rates.get("baseline", [float("nan")]))
    for o, rs in rates.items():
        grey_ref = rates.get("grey_baseline")
        ref = statistics.median(grey_ref) if o == "grey_jitter" and grey_ref else base
        print(f"| {o} | {statistics.median(rs):.2f} | {statistics.median(rs) / ref:.2f}x |")
    s_val = val_seconds(model, colour, a.size, min(a.val, a.images))
    s_val *= a.val / min(a.val, a.images)
    s_train = a.train / base
    print(
        f"\nvalidation pass over {a.val} images: {s_val:.1f} s; one training epoch of "
        f"{a.train} images at the baseline rate: {s_train:.1f} s "
        f"(validation = {s_val / (s_val + s_train):.0%} of an epoch with eval_every=1)"
    )
    print(f"Phase 1 training images/s before: {base:.2f}")
    best = max(rates, key=lambda o: statistics.median(rates[o]))
    print(
        f"Phase 1 training images/s after (best option, {best}): {statistics.median(rates[best]):.2f}"
    )


if __name__ == "__main__":
    main()
