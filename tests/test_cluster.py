"""The SLURM profile (profiles/slurm), dry-run: one job per model, on the right partitions.

A dry run needs the executor plugin but no cluster: Snakemake plans the jobs with the
profile's resources and submits nothing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, copy_workflow, our_lines, run_snakemake
from defectfusion.config import read_yaml


def micro_dry_run(workdir: Path, config: str) -> subprocess.CompletedProcess:
    """`snakemake -n` of the micro profile with `--config CONFIG`, on a machine that does not
    claim a GPU (DEFECTFUSION_ALLOW_CPU unset)."""
    env = {k: v for k, v in os.environ.items() if k != "DEFECTFUSION_ALLOW_CPU"}
    return run_snakemake(workdir, "-n", "--config", config, env=env)


@pytest.mark.skipif(
    importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
    reason="snakemake-executor-plugin-slurm is not installed (pip install -e '.[dev]')",
)
def test_slurm_profile_dry_run_plans_one_gpu_job_per_model(tmp_path: Path) -> None:
    copy_workflow(tmp_path)  # profiles/ included
    env = {**os.environ, "DEFECTFUSION_ALLOW_CPU": "1"}  # this machine has no GPU
    r = subprocess.run(
        ["snakemake", "--profile", "profiles/slurm", "-n", "--configfile", "configs/micro.yaml",
         "--config", 'pipeline={"requires_gpu": true, "gpus": 2}'],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = re.split(r"\n(?=\[.*\]\n(?:local)?rule )", r.stdout)
    by_rule: dict[str, list[str]] = {}
    for job in jobs:
        m = re.search(r"^(?:local)?rule (\w+):", job, re.M)
        if m:
            by_rule.setdefault(m.group(1), []).append(job)
    micro = read_yaml(tmp_path / "configs/micro.yaml")["pipeline"]
    n_phase2 = len(micro["variants"]) * len(micro["seeds"])
    assert len(by_rule["phase1"]) == 3 and len(by_rule["phase2"]) == n_phase2  # one job a model
    for job in by_rule["phase1"] + by_rule["phase2"]:
        assert "slurm_partition=gpu" in job and "gpu=2" in job
        assert "torchrun --standalone --nproc-per-node 2 -m defectfusion.cli train" in job
    for job in by_rule["table"] + by_rule["figure"]:
        assert "slurm_partition=cpu" in job


def test_a_gpu_profile_stops_before_any_work_without_a_gpu(tmp_path: Path) -> None:
    copy_workflow(tmp_path)
    r = micro_dry_run(tmp_path, 'pipeline={"requires_gpu": true}')
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has a GPU")
    assert r.returncode != 0
    assert "trains on a GPU and none is visible" in r.stderr  # one line, no traceback
    assert len(our_lines(r.stderr)) == 1


def test_missing_weights_stop_the_pipeline_before_any_work(tmp_path: Path) -> None:
    copy_workflow(tmp_path)
    r = micro_dry_run(tmp_path, "model={'init': 'backbone', 'weights': './weights/dinov3'}")
    assert r.returncode != 0
    assert "model.weights='./weights/dinov3': no such file or folder" in r.stderr
    assert len(our_lines(r.stderr)) == 1
    assert not (tmp_path / "data").exists()


def test_weights_problem_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from defectfusion.workflow.preflight import weights_problem

    assert weights_problem("model.weights", None) is None
    assert weights_problem("model.weights", str(ROOT)) is None  # an existing folder
    assert "no such file" in weights_problem("model.weights", "~/nope/dinov3")
    assert weights_problem("text.weights", "openai", names_ok=True) is None  # an open_clip tag
    assert weights_problem("model.weights", "facebook/never-cached") is None  # online: downloads
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = weights_problem("model.weights", "facebook/never-cached")
    assert "HF_HUB_OFFLINE" in msg and "hf download facebook/never-cached" in msg


def test_a_bad_config_value_stops_the_pipeline_before_any_work(tmp_path: Path) -> None:
    """Every section is typed, `pipeline` included: a typo in a value the user gives
    Snakemake stops the run in one line that names it, before any job."""
    copy_workflow(tmp_path)
    for value, message in (
        ("phase2={'lrr': 0.1}", "phase2: unknown key(s) ['lrr']"),
        ("pipeline={'variants': ['zero_start', 'nope']}", "pipeline.variants has ['nope']"),
        ("pipeline={'seeds': 3}", "pipeline.seeds: expected a list"),  # was a TypeError trace
    ):
        r = micro_dry_run(tmp_path, value)
        assert r.returncode != 0
        assert message in r.stderr, r.stderr
        assert len(our_lines(r.stderr)) == 1, r.stderr


def test_a_false_given_with_config_is_false_in_the_workflow(tmp_path: Path) -> None:
    """Snakemake hands `{"requires_gpu": false}` over as the text 'false'; read raw, it would
    make the workflow ask for a GPU."""
    copy_workflow(tmp_path)
    r = micro_dry_run(tmp_path, 'pipeline={"requires_gpu": false}')
    assert r.returncode == 0, r.stderr[-2000:]
    assert "gpu=1" not in r.stdout and "torchrun" not in r.stdout
