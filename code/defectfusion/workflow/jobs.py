"""Running Snakemake from Python: a command whose failure is one line (`run_command`), one
streamed to the terminal (`stream_command`), and the jobs a run would make, counted from
Snakemake's own summary (`planned_jobs`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from defectfusion.core.errors import UserError


def run_command(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise UserError(f"{cmd[0]} not found on PATH; install the project (pip install -e .)")
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        detail = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1] if lines else "")
        raise UserError(f"{what} failed ({' '.join(cmd[:3])} ...): {detail}")
    return r


def stream_command(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd)  # not captured: the user watches Snakemake's progress
    if r.returncode:
        raise UserError(f"{' '.join(cmd)} failed (exit {r.returncode}); see its output above")


def job_counts(output: str) -> dict[str, int]:
    """The jobs in Snakemake's job-stats tables, by rule; empty when there was nothing to do.
    A dry run prints its table twice and `dvc repro`'s two passes one each: a rule's count is
    the last one printed, never a sum."""
    counts: dict[str, int] = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("job", "rule", "total"):
            counts[parts[0]] = int(parts[1])
    return counts


def planned_jobs(root: str | Path = ".", *args: str) -> dict[str, int]:
    """The jobs `snakemake -n ARGS` would run in `root`, by rule."""
    r = run_command(
        ["snakemake", "--cores", "1", "-n", "--quiet", "rules", *args], Path(root), "planning"
    )
    return job_counts(r.stdout + r.stderr)
