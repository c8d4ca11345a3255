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


def ran_stages(out: str) -> list[str]:
    """The stages `dvc repro` ran, from its output."""
    return re.findall(r"Running stage '([^']+)'", out)


def planned_rules(cwd: Path) -> list[str]:
    out = sh(cwd, "snakemake", "--cores", "2", "-n", "--quiet", "rules").stdout
    return [
        ln.split()[0]
        for ln in out.splitlines()
        if len(ln.split()) == 2 and ln.split()[1].isdigit() and ln.split()[0] != "total"
    ]


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
    out = sh(repo, "dvc", "repro").stdout
    assert ran_stages(out) == ["snakemake_sync"], out[-2000:]  # only the mtime sync


def test_snakemake_after_dvc_repro_does_nothing(repo: Path) -> None:
    assert planned_rules(repo) == []


def test_metrics_params_and_plots_work_offline(repo: Path) -> None:
    metrics = sh(repo, "dvc", "metrics", "show", "--json").stdout
    assert '"map"' in metrics and "test_metrics.headline.json" in metrics
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
        status = sh(repo, "dvc", "status", "--json").stdout
        changed = {s.split("@")[0] for s in json.loads(status)}
        assert "phase2" in changed and "phase1" not in changed and "data" not in changed
    finally:
        (repo / "params.yaml").write_text(backup)


def test_a_data_change_reruns_exactly_what_depends_on_it(repo: Path) -> None:
    before = {
        p: (repo / p).read_bytes()
        for p in ("runs/phase1/deimv2-dinov3-tiny/best.pt", "data/micro/annotations/train.json")
    }
    # The test split grows: training data is byte-identical, so nothing retrains.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pipeline"]["dataset"]["n_test"] += 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(repo, "dvc", "repro").stdout
    ran = {s.split("@")[0] for s in ran_stages(out)}
    assert ran == {
        "data",
        "evaluate_phase1",
        "evaluate_phase2",
        "compare",
        "postmortem",
        "report",
        "book",
        "snakemake_sync",
    }, out[-3000:]
    assert not ran & {"text_embed", "phase1", "phase2"}
    for p, content in before.items():
        assert (repo / p).read_bytes() == content, p
    n = json.loads((repo / "results/phase1/deimv2-dinov3-tiny/test_metrics.json").read_text())
    assert n["n_images"] == params["pipeline"]["dataset"]["n_test"]
    assert planned_rules(repo) == []  # and Snakemake agrees
    assert ran_stages(sh(repo, "dvc", "repro").stdout) == ["snakemake_sync"]


def test_the_committee_rebuilds_from_the_remote_without_training(
    repo: Path, tmp_path: Path
) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "a larger test split")
    sh(repo, "dvc", "push", "-q")
    clone = tmp_path / "clone"  # a fresh clone: sources, dvc.yaml, dvc.lock; no data, no runs
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "runs").exists() and not (clone / "results/summary.json").exists()

    out = sh(clone, "defectfusion", "pipeline", "rebuild", "--cores", "2")
    assert "3/3" in out.stdout
    assert (clone / "thesis/_build/html/index.html").is_file()
    assert (clone / "results/tables/phase2.md").is_file()
    assert (clone / "figures/postmortem.png").is_file()
    # Nothing trained: no training logs, no resume state; the checkpoints are the pulled ones.
    assert not (clone / "logs/phase1").exists() and not (clone / "logs/phase2").exists()
    assert not list(clone.glob("runs/**/last.pt"))
    for f in (
        "results/phase1/deimv2-dinov3-tiny/test_metrics.json",
        "results/compare/zero_start_seed0.json",
    ):
        a, b = json.loads((repo / f).read_text()), json.loads((clone / f).read_text())
        assert a.get("map") == b.get("map") and a.get("metrics") == b.get("metrics"), f


def test_rebuild_without_a_lock_is_one_line(tmp_path: Path) -> None:
    r = sh(tmp_path, "defectfusion", "pipeline", "rebuild", check=False)
    assert r.returncode == 2 and "dvc.lock" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- dvc.yaml against the Snakefile (static: no run needed) --------------------------------


def _dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_every_snakemake_rule_has_a_dvc_stage() -> None:
    rules = set(re.findall(r"^rule (\w+):", (ROOT / "Snakefile").read_text(), re.M))
    allowed: set[str] = set()
    for stage in _dvc_yaml()["stages"].values():
        cmd = (stage.get("do") or stage)["cmd"]
        m = re.search(r"--allowed-rules ((?:\w+ )+)--", cmd)
        if m:
            allowed |= set(m.group(1).split())
    assert rules - allowed == {"all", "trained"}  # targets, not work
    assert allowed <= rules


def test_dvc_plots_are_the_report_figures() -> None:
    from defectfusion.report import FIGURES

    plots = {Path(p).stem for p in _dvc_yaml()["plots"]}
    assert plots == set(FIGURES)


def test_the_book_stage_depends_on_every_book_source() -> None:
    deps = set(_dvc_yaml()["stages"]["book"]["deps"])
    sources = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "thesis").rglob("*")
        if p.is_file() and not {"_build", "__pycache__"} & set(p.relative_to(ROOT).parts)
    }
    uncovered = {s for s in sources if not any(s == d or s.startswith(d + "/") for d in deps)}
    assert not uncovered


def test_a_run_with_an_overlay_is_not_recorded(tmp_path: Path) -> None:
    from defectfusion.pipeline import record_in_dvc_lock

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
