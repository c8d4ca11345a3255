"""DDP through accelerate: 2 CPU processes (gloo) against one process, same global batch.

The two runs see the same images in the same global batches (accelerate's split_batches;
each image carries its own augmentation seed), and the loss is normalised by the global
box count as in DETR, so they follow the same loss trajectory. They are not bit-equal:
BatchNorm statistics come from half batches, and DEIMv2's denoising noise is drawn per
process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _steps(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from defectfusion.data.synth import SynthSpec, generate

    out = tmp_path_factory.mktemp("ddp_synth")
    generate(out, SynthSpec(n_train=16, n_val=4, n_test=4, image_size=96))
    return out


def _train(data: Path, out: Path, nproc: int) -> None:
    args = [
        "train", "phase1", "--out", str(out), "--set", f"data.dir={data}",
        "--set", "data.image_size=96", "--set", "phase1.epochs=2", "--set", "phase1.max_epochs=0",
        "--set", "phase1.batch_size=4",
        "--set", "phase1.warmup_steps=2", "--set", "eval.batch_size=4", "--config",
    ]  # fmt: skip
    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text("seed: 0\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "defectfusion.cli", *args, str(cfg)]
    else:
        torchrun = shutil.which("torchrun")
        assert torchrun, "torchrun (ships with torch) is not on PATH"
        cmd = [torchrun, "--nproc-per-node", str(nproc), "--master-port", "29517",
               "-m", "defectfusion.cli", *args, str(cfg)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_follow_the_single_process_loss_trajectory(
    ddp_data: Path, tmp_path: Path
) -> None:
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _train(ddp_data, single, 1)
    _train(ddp_data, ddp, 2)
    a, b = _steps(single), _steps(ddp)
    print("single:", [round(x, 3) for x in a], "\nDDP x2:", [round(x, 3) for x in b])
    assert len(a) == len(b) == 8  # 16 images, global batch 4, 2 epochs: same step count
    for step, (x, y) in enumerate(zip(a, b, strict=True), 1):
        assert abs(x - y) / x < 0.15, f"step {step}: single {x:.3f} vs DDP {y:.3f}"
    assert b[-1] < b[0] and a[-1] < a[0]  # both learn
