"""benchmarks/run_times.py: per-rule times and the critical path of a finished run, on
constructed benchmark files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from run_times import critical_path, main, rule_of  # noqa: E402

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def write(folder: Path, name: str, wall: float, cpu: float, end: float) -> None:
    path = folder / f"{name}.tsv"
    path.write_text(HEADER + f"{wall}\t0:00:00\t1\t1\t1\t1\t0\t0\t100\t{cpu}\n", encoding="utf-8")
    os.utime(path, (end, end))


def test_rules_come_from_the_longest_prefix() -> None:
    assert rule_of("evaluate_phase1_deimv2-dinov3-tiny_test") == "evaluate_phase1"
    assert rule_of("phase1_deimv2-dinov3-tiny") == "phase1"
    assert rule_of("phase2_zero_start_seed0") == "phase2"
    assert rule_of("report_figure_confusion") == "report_figure"
    assert rule_of("something_else") is None


def test_the_critical_path_is_the_heaviest_chain() -> None:
    edges = [("data", "phase1"), ("data", "text_embed"), ("phase1", "phase2"),
             ("text_embed", "phase2"), ("phase2", "postmortem")]  # fmt: skip
    longest = {"data": 1, "text_embed": 50, "phase1": 10, "phase2": 5, "postmortem": 2}
    assert critical_path(longest, edges) == ["data", "text_embed", "phase2", "postmortem"]


def test_the_table_of_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "benchmarks/results"
    folder.mkdir(parents=True)
    write(folder, "data", 10, 12, 1000)
    write(folder, "phase1_deimv2-dinov3-tiny", 100, 190, 1110)
    write(folder, "phase2_zero_start_seed0", 30, 29, 1150)
    write(folder, "phase2_zero_start_seed1", 40, 39, 1160)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    phase2 = next(line for line in out.splitlines() if line.startswith("phase2 "))
    assert phase2.split()[1:5] == ["2", "70", "40", "68"]  # jobs, wall, longest, cpu
    assert "end to end: 170 s" in out  # from 1000 - 10 to 1160
    assert "critical path: data -> phase1 -> phase2" in out
    assert main([str(tmp_path / "none")]) == 2
