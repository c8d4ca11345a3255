"""DVC and Snakemake together, on the micro profile: neither redoes the other's work, a data
change reruns exactly what depends on it, and the committee rebuilds without training.

The DVC repository is a copy of the micro run (tests/conftest.py `micro_run`) with DVC
initialised and params.yaml made the micro profile (`defectfusion pipeline use-profile`), as a
thesis author would before versioning a run. Tests in this file build on each other's state
and run in order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("dvc") is None, reason="dvc is not installed")

ENV = {
    "DVC_NO_ANALYTICS": "1",  # offline: no usage reports
    "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.org",
    "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.org",
}  # fmt: skip


def sh(cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV}
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800, env=env)
    if check:
        assert r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])
    return r


def jobs_run(r: subprocess.CompletedProcess) -> set[str]:
    """The Snakemake rules a `dvc repro` ran (its stage runs Snakemake with `--quiet rules`,
    which prints each pass's job counts, to stderr), or a dry run planned."""
    from defectfusion.workflow.jobs import job_counts

    return set(job_counts(r.stdout + r.stderr))


def planned_rules(cwd: Path) -> list[str]:
    from defectfusion.workflow.jobs import planned_jobs

    return sorted(planned_jobs(cwd))


def clean(cwd: Path) -> bool:
    return "Data and pipelines are up to date" in sh(cwd, "dvc", "status").stdout


@pytest.fixture(scope="module")
def repo(micro_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("dvcrepo") / "repo"
    shutil.copytree(micro_run, work, symlinks=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(ROOT / name, work / name)
    sh(work, "git", "init", "-q")
    sh(work, "dvc", "init", "-q")
    sh(work, "dvc", "remote", "add", "-d", "store", str(work.parent / "store"))
    out = sh(work, "defectfusion", "pipeline", "use-profile", "configs/micro.yaml").stdout
    assert "params.yaml" in out
    # The same values, now in params.yaml (in another key order): nothing is out of date, so
    # Snakemake has nothing to do (and records nothing): `pipeline record` writes dvc.lock.
    assert planned_rules(work) == [], "use-profile alone made Snakemake plan a rerun"
    run = sh(work, "defectfusion", "pipeline", "record")
    assert "dvc.lock updated" in run.stdout, run.stdout[-2000:]
    sh(work, "git", "add", "-A")
    sh(work, "git", "commit", "-q", "-m", "the micro run")
    return work


def test_use_profile_keeps_comments_and_matches_the_overlay(repo: Path) -> None:
    from defectfusion.config import deep_merge, read_yaml

    text = (repo / "params.yaml").read_text()
    assert "# The single source of hyperparameters" in text  # comments survive
    merged = deep_merge(read_yaml(ROOT / "params.yaml"), read_yaml(ROOT / "configs/micro.yaml"))
    params = yaml.safe_load(text)
    assert params["pipeline"]["profile"] == "micro"
    assert params == merged
    summary = json.loads((repo / "results/summary.json").read_text())
    assert summary["run"]["profile"] == "micro"  # the book still names the profile


def test_dvc_repro_after_snakemake_redoes_nothing(repo: Path) -> None:
    assert clean(repo)
    r = sh(repo, "dvc", "repro")
    assert "Running stage" not in r.stdout and jobs_run(r) == set(), r.stdout[-2000:]


def test_snakemake_after_dvc_repro_does_nothing(repo: Path) -> None:
    assert planned_rules(repo) == []


def test_metrics_params_and_plots_work_offline(repo: Path) -> None:
    metrics = sh(repo, "dvc", "metrics", "show", "--json").stdout
    assert '"map"' in metrics and "results/metrics/phase2/zero_start_seed0.json" in metrics
    # A readable table: each model's headline numbers, not every per-class value.
    table = sh(repo, "dvc", "metrics", "show").stdout
    assert max(len(line) for line in table.splitlines()) < 200, table[:500]
    site = repo.parent / "dvc_plots"
    plots = sh(repo, "dvc", "plots", "show", "--out", str(site)).stdout
    html = (site / "index.html").read_text()
    assert "<img" in html and "phase1_curves.png" in html, plots
    assert not re.search(r"<script[^>]+src=.http", html)  # nothing loads from the internet
    # The training history as data DVC can plot (`.jsonl` it rejects): one point per epoch.
    hist = "results/phase1/deimv2-dinov3-tiny/history.csv"
    data = sh(repo, "dvc", "plots", "show", "--json", "-x", "epoch", "-y", "val_map", hist).stdout
    assert "val_map" in data
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["phase2"]["lr"] = 0.0002
    backup = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        diff = sh(repo, "dvc", "params", "diff").stdout
        assert "phase2.lr" in diff and "0.0002" in diff
        assert not clean(repo)  # DVC sees the value change; Snakemake says what it reruns
        planned = set(planned_rules(repo))
        assert "phase2" in planned and not planned & {"data", "text_embed", "phase1"}
    finally:
        (repo / "params.yaml").write_text(backup)


def test_dvc_exp_run_with_a_data_change_reruns_exactly_what_depends_on_it(repo: Path) -> None:
    """`dvc exp run -S` (DVC's repro with changed values): the test split grows and Phase 2's
    learning rate changes. Snakemake remakes the data and, in its second pass, compares it by
    content: the training split is byte-identical, so nothing that reads only train and val
    reruns for it (Phase 1, the text embeddings); Phase 2 retrains for its new value, which
    reaches the job (read back from the checkpoint). In the workspace (the default), not
    --temp or --queue: a fresh checkout's files all have new times, so Snakemake would redo
    everything there. (One run for both: each costs a full evaluation, report and book.)"""
    import torch

    before = {
        p: (repo / p).read_bytes()
        for p in ("runs/phase1/deimv2-dinov3-tiny/best.pt", "data/micro/annotations/train.json")
    }
    n_test = yaml.safe_load((repo / "params.yaml").read_text())["pipeline"]["dataset"]["n_test"]
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "--allow-empty", "-m", "before the experiment")
    r = sh(
        repo, "dvc", "exp", "run",
        "-S", f"pipeline.dataset.n_test={n_test + 2}", "-S", "phase2.lr=0.00031",
    )  # fmt: skip
    ran, out = jobs_run(r), r.stdout + r.stderr
    assert {"data", "phase2", "evaluate_phase1", "evaluate_phase2", "book"} <= ran, out[-3000:]
    assert not ran & {"text_embed", "phase1"}, out[-3000:]
    for p, content in before.items():
        assert (repo / p).read_bytes() == content, p
    n = json.loads((repo / "results/phase1/deimv2-dinov3-tiny/test_metrics.json").read_text())
    assert n["n_images"] == n_test + 2
    ckpt = torch.load(repo / "runs/phase2/zero_start/seed0/best.pt", weights_only=True)
    assert ckpt["meta"]["config"]["phase2"]["lr"] == 0.00031
    assert "0.00031" in sh(repo, "dvc", "exp", "show", "--json").stdout
    # both tools agree: nothing left to do
    assert clean(repo) and planned_rules(repo) == []
    assert jobs_run(sh(repo, "dvc", "repro")) == set()


def test_the_committee_rebuilds_from_the_remote_without_training(
    repo: Path, tmp_path: Path
) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "--allow-empty", "-m", "a larger test split")
    sh(repo, "dvc", "push", "-q")
    clone = tmp_path / "clone"  # a fresh clone: sources, dvc.yaml, dvc.lock; no data, no runs
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "runs").exists() and not (clone / "results/summary.json").exists()

    out = sh(clone, "defectfusion", "pipeline", "rebuild", "--cores", "2")
    assert "3/3" in out.stdout
    assert (clone / "thesis/_build/html/index.html").is_file()
    assert (clone / "results/tables/phase2.md").is_file()
    assert (clone / "figures/postmortem.png").is_file()
    # Nothing trained: empty training logs (`snakemake --touch` creates them), no resume state,
    # and the checkpoints are the pulled ones.
    logs = list(clone.glob("logs/phase[12]/*.log"))
    assert logs and all(log.stat().st_size == 0 for log in logs)
    assert not list(clone.glob("runs/**/last.pt"))
    for ckpt in ("runs/phase1/deimv2-dinov3-tiny/best.pt", "runs/phase2/zero_start/seed0/best.pt"):
        assert (clone / ckpt).read_bytes() == (repo / ckpt).read_bytes(), ckpt
    # and Snakemake, asked again, has nothing left to do: the touch left consistent times
    assert planned_rules(clone) == []
    for f in (
        "results/phase1/deimv2-dinov3-tiny/test_metrics.json",
        "results/compare/zero_start_seed0.json",
    ):
        a, b = json.loads((repo / f).read_text()), json.loads((clone / f).read_text())
        assert a.get("map") == b.get("map") and a.get("metrics") == b.get("metrics"), f


def test_a_run_of_some_targets_only_is_not_recorded(repo: Path) -> None:
    """dvc.lock vouches for every output of the stage: after a value changed, a run that
    remade one target (here the text embeddings) must not record the rest as made with it."""
    backup = (repo / "params.yaml").read_text()
    params = yaml.safe_load(backup)
    params["phase2"]["lr"] = 0.0007
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        r = sh(repo, "snakemake", "--cores", "1", "--forcerun", "text_embed", "--",
               "results/text/embeddings.pt")  # fmt: skip
        assert "dvc.lock not updated: the workflow still has jobs to run" in r.stdout + r.stderr
        assert not clean(repo)
    finally:
        (repo / "params.yaml").write_text(backup)


def test_a_deleted_checkpoint_is_never_vouched_for(repo: Path) -> None:
    """`rm` of a baseline's best.pt and a figure, then `dvc repro`, rebuilt the figure only
    and recorded the lock without the checkpoint: `dvc status` then said "up to date" while
    Snakemake still planned the Phase 1 job (issue 27). The lock must never vouch for a
    missing output: DVC sees the change, and `dvc repro` rebuilds both."""
    ckpt = repo / "runs/phase1/deimv2-resnet-tiny/best.pt"
    figure = repo / "figures/per_class.png"
    if not clean(repo):  # the test before forced a job: bring the lock up to date first
        sh(repo, "dvc", "repro")
    assert clean(repo)
    ckpt.unlink()
    figure.unlink()
    assert not clean(repo)
    r = sh(repo, "dvc", "repro")
    assert ckpt.is_file() and figure.is_file(), (r.stdout + r.stderr)[-3000:]
    assert "phase1" in jobs_run(r), (r.stdout + r.stderr)[-3000:]
    assert clean(repo) and planned_rules(repo) == []
    # the same through `pipeline record`: with the checkpoint gone it records nothing
    ckpt.unlink()
    out = sh(repo, "defectfusion", "pipeline", "record").stdout
    assert "dvc.lock not updated" in out and not clean(repo)
    sh(repo, "dvc", "repro")
    assert ckpt.is_file() and clean(repo)


def test_rebuild_without_a_lock_is_one_line(tmp_path: Path) -> None:
    r = sh(tmp_path, "defectfusion", "pipeline", "rebuild", check=False)
    assert r.returncode == 2 and "dvc.lock" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- dvc.yaml against the Snakefile ----------------------------------------------------------


def _dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_the_dvc_stage_covers_every_job_of_the_snakefile(repo: Path) -> None:
    """The one stage's outs hold every file a job makes, and its deps every file a job reads
    that no job makes (code, prompts, the book's sources): so DVC versions all of the run
    and `dvc repro` runs Snakemake whenever any of its inputs changed."""
    stage = _dvc_yaml()["stages"]["pipeline"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
    outs = [o.replace("${data.dir}", params["data"]["dir"]) for o in outs]
    deps = list(stage["deps"])

    def under(path: str, roots: list[str]) -> bool:
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    summary = sh(repo, "snakemake", "--cores", "1", "--detailed-summary").stdout
    rows = [ln.split("\t") for ln in summary.splitlines()[1:] if ln.strip()]
    made = {r[0] for r in rows}
    read = {f for r in rows for f in r[4].split(",") if f and f != "-"}
    assert made and read
    assert {f for f in made if not under(f, outs)} == set()
    # (the report reads the jobs' benchmark files, outputs the summary does not list)
    assert {f for f in read - made if not under(f, deps) and not under(f, outs)} == set()
    # benchmarks (each job's time, quoted by the book) are versioned; logs are not
    assert under("benchmarks/results/phase1_deimv2-dinov3-tiny.tsv", outs)


def test_dvc_plots_are_the_report_figures() -> None:
    from defectfusion.report import FIGURES

    plots = {Path(p).stem for p in _dvc_yaml()["plots"]}
    assert plots == set(FIGURES)


def test_the_stage_depends_on_every_book_source() -> None:
    deps = set(_dvc_yaml()["stages"]["pipeline"]["deps"])
    sources = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "thesis").rglob("*")
        if p.is_file() and not {"_build", "__pycache__"} & set(p.relative_to(ROOT).parts)
    }
    uncovered = {s for s in sources if not any(s == d or s.startswith(d + "/") for d in deps)}
    assert not uncovered


def test_a_run_with_an_overlay_is_not_recorded(tmp_path: Path) -> None:
    from defectfusion.workflow.versioning import record_in_dvc_lock

    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    assert "differs from params.yaml" in record_in_dvc_lock({"seed": 1}, tmp_path)
    assert "no DVC repository" in record_in_dvc_lock({"seed": 0}, tmp_path / "nowhere")


def test_use_profile_with_a_missing_or_malformed_params_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("a: [1\n")
    for params, message in ((tmp_path / "nope.yaml", "config file not found"), (bad, "malformed")):
        r = sh(
            tmp_path, "defectfusion", "pipeline", "use-profile",
            str(ROOT / "configs/micro.yaml"), "--params", str(params), check=False,
        )  # fmt: skip
        assert r.returncode == 2 and message in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert bad.read_text() == "a: [1\n"  # nothing half-written


@pytest.mark.parametrize(
    "profile, message",
    [
        ("phase1: {epochs: -3}\n", "phase1.epochs=-3"),
        ("phase2: {lr: abc}\n", "phase2.lr"),
        ("nonsense: 1\n", "nonsense"),
        ("pipeline: 3\n", "pipeline"),
    ],
)
def test_use_profile_refuses_a_profile_the_pipeline_would_refuse(
    tmp_path: Path, profile: str, message: str
) -> None:
    """Invalid values used to be written into params.yaml with a success message (issue 27)."""
    import shutil

    from defectfusion.core.errors import UserError
    from defectfusion.workflow.versioning import use_profile

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text(encoding="utf-8")
    (tmp_path / "bad.yaml").write_text(profile, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        use_profile(tmp_path / "bad.yaml", params)
    assert params.read_text(encoding="utf-8") == before
