"""Shared pytest setup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# No per-example deadline: a loaded CI machine is slow, and speed is not what these test.
settings.register_profile("defectfusion", deadline=None)
settings.load_profile("defectfusion")


# Idle OpenMP threads sleep instead of spinning: the README's test command runs the unit tests
# beside the micro pipeline's jobs, and spinning threads of one process starve the other's
# (GNU OpenMP's default spin-wait made an oversubscribed 2-core run 7x slower). Set before torch
# is imported; the pipeline's jobs inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PIPELINE_GROUP = "micro_pipeline"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests that run the micro pipeline end to end (and DVC on it) share its session run:
    under pytest-xdist (`-n 2 --dist loadgroup`, the README's command) they form one group, sent
    first to one worker, while the other worker takes the unit tests. Run serially, the unit
    tests come first, so a broken unit fails fast."""
    xdist = hasattr(config, "workerinput")  # set on an xdist worker only

    def uses_pipeline(item: pytest.Item) -> bool:
        return "micro_run" in getattr(item, "fixturenames", ())

    for item in items:
        if uses_pipeline(item):
            item.add_marker(pytest.mark.xdist_group(PIPELINE_GROUP))
    items.sort(key=lambda item: uses_pipeline(item) != xdist)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """One intra-op thread: the tests' models are tiny, and CPUs are shared."""
    import torch

    torch.set_num_threads(1)


# ---- tiny Phase 1 setup (tests/test_models.py, test_train.py, test_checkpoint.py) ----------

# The smallest input DEIMv2 accepts for the tiny presets: they pick 100 queries among the
# anchors of strides 8/16/32, and 96 px has 189 of them (64 px, 84: refused).
TINY_SIZE = 96


def tiny_overrides(data_dir: Path, epochs: int = 2, **extra: object) -> list[str]:
    """`--set` overrides of a seconds-long Phase 1 run on the tiny synth dataset."""
    values = {
        "data.dir": str(data_dir),
        "data.image_size": TINY_SIZE,
        "model.preset": "deimv2-dinov3-tiny",
        "phase1.epochs": epochs,
        "phase1.max_epochs": 0,  # the schedule only, no extension to the plateau
        "phase1.batch_size": 4,
        "phase1.warmup_steps": 2,
        "phase1.ema_decay": 0.0,  # no EMA: best.pt holds the trained weights themselves
        "eval.batch_size": 4,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8/4/4 synth images of 96 px (a fraction of a second to make)."""
    from defectfusion.data.synth import SynthSpec, generate

    out = tmp_path_factory.mktemp("tiny_synth")
    generate(out, SynthSpec(n_train=8, n_val=4, n_test=4, image_size=TINY_SIZE))
    return out


@pytest.fixture(scope="session")
def tiny_cfg(tiny_data: Path):
    """``tiny_cfg(epochs=2, **{"phase1.lr": 0.002})``: the Config of a tiny Phase 1 run."""
    from defectfusion.config import load_config

    def make(epochs: int = 2, **extra: object):
        return load_config(overrides=tiny_overrides(tiny_data, epochs, **extra))

    return make


@pytest.fixture(scope="session")
def tiny_run(tiny_cfg, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch Phase 1 run folder (history, steps, log, last.pt, best.pt)."""
    from defectfusion.train.phase1 import train_phase1

    out = tmp_path_factory.mktemp("tiny_run")
    train_phase1(tiny_cfg(), out)
    return out


# ---- the micro pipeline, run once per session (tests/test_pipeline.py, test_report.py) -----

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = (  # fmt: skip
    "Snakefile", "rules", "params.yaml", "configs", "profiles", "prompts", "code", "thesis", "report",
    "requirements.lock",
)
MICRO = ["--configfile", "configs/micro.yaml"]


def copy_workflow(dst: Path, extra: tuple[str, ...] = ()) -> Path:
    """Copy the workflow's files (and `extra` ones) to `dst`, so runs leave the checkout alone."""
    import shutil

    skip = shutil.ignore_patterns("__pycache__", "_build", "*.egg-info")
    for name in (*WORKFLOW_FILES, *extra):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=skip)
        elif src.is_file():
            shutil.copy2(src, dst / name)
    return dst


def our_lines(stderr: str) -> list[str]:
    """A Snakemake run's stderr without Snakemake's notice that it read profiles/default:
    what the workflow itself printed (a config or preflight error must be one line)."""
    notice = "Using workflow specific profile"
    return [ln for ln in stderr.strip().splitlines() if not ln.startswith(notice)]


def run_snakemake(workdir: Path, *args: str, env: dict[str, str] | None = None):
    """`snakemake --cores 2 --configfile configs/micro.yaml ARGS` in `workdir`."""
    import subprocess

    return subprocess.run(
        ["snakemake", "--cores", "2", *MICRO, *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole workflow on the micro profile, in a copy of the workflow's files (Snakefile,
    params, profiles, prompts, code, the book's sources), so the checkout is not touched."""

    reuse = os.environ.get("DEFECTFUSION_TEST_MICRO_RUN")
    if reuse:  # a finished run of an earlier session, to iterate on the pipeline's tests
        return Path(reuse)
    work = copy_workflow(tmp_path_factory.mktemp("pipeline"))
    out = run_snakemake(work)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    return work
