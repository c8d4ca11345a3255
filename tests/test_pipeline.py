"""The Snakemake pipeline on the micro profile, end to end, and its incrementality.

The run (the session fixture `micro_run` of conftest.py, shared with test_report.py) happens
in a copy of the workflow's files, so the checkout is not touched.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import run_snakemake


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return run_snakemake(workdir, *args)


def _planned(workdir: Path, *args: str) -> dict[str, int]:
    """Dry run: the jobs Snakemake would run now, counted by rule."""
    out = _snakemake(workdir, "-n", "--quiet", "rules", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    counts: dict[str, int] = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "rule"):
            counts[parts[0]] = int(parts[1])
    return counts


def test_micro_profile_produces_every_result(micro_run: Path) -> None:
    cfg_presets = ["deimv2-dinov3-tiny", "deimv2-resnet-tiny", "deimv2-efficientnet-tiny"]
    for preset in cfg_presets:
        metrics = json.loads((micro_run / f"results/phase1/{preset}/test_metrics.json").read_text())
        assert 0.0 <= metrics["map"] <= 1.0
    for variant in ("zero_start", "naive", "frozen0", "deimv2_loss", "bn_train"):
        history = (
            (micro_run / f"results/phase2/{variant}/seed0/history.jsonl").read_text().splitlines()
        )
        assert json.loads(history[0])["epoch"] == 0  # the epoch-0 evaluation is logged
        cmp = json.loads((micro_run / f"results/compare/{variant}_seed0.json").read_text())
        assert "map" in json.dumps(cmp)


def test_second_run_does_nothing(micro_run: Path) -> None:
    assert _planned(micro_run) == {}


def test_phase2_param_change_reruns_phase2_not_phase1(micro_run: Path) -> None:
    planned = _planned(micro_run, "--config", "phase2={'lr': 0.0001}")
    assert planned.get("phase2") == 5
    assert "phase1" not in planned and "data" not in planned and "text_embed" not in planned


def test_phase1_param_change_reruns_phase1_and_what_follows(micro_run: Path) -> None:
    planned = _planned(micro_run, "--config", "phase1={'lr': 0.002}")
    assert planned.get("phase1") == 3 and planned.get("phase2") == 5
    assert "data" not in planned
