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


def test_restyling_one_figure_redraws_only_that_figure(micro_run: Path) -> None:
    planned = _planned(micro_run, "--config", "figure_style={'postmortem': {'lines.linewidth': 2}}")
    assert planned.get("figure") == 1
    assert not set(planned) & {"table", "summary", "phase1", "phase2", "evaluate_phase1"}
    assert set(planned) <= {"figure", "provenance", "book", "all"}


def test_the_readme_rule_graph_is_the_snakefile_s(tmp_path: Path) -> None:
    """docs/rulegraph.{dot,png} (the README's figure) must match the current Snakefile:
    regenerate with `defectfusion pipeline rulegraph` when a rule's inputs change."""
    from conftest import ROOT, copy_workflow
    from defectfusion.pipeline import rulegraph_edges, write_rulegraph

    copy_workflow(tmp_path)
    dot, png = write_rulegraph(tmp_path / "rulegraph.png", root=tmp_path)
    nodes, edges = rulegraph_edges(dot.read_text())
    committed = rulegraph_edges((ROOT / "docs/rulegraph.dot").read_text())
    assert (nodes, edges) == committed, "docs/rulegraph.* is stale: rerun the command above"
    assert ("phase1", "phase2") in edges and ("data", "phase1") in edges
    assert png.stat().st_size > 10_000 and (ROOT / "docs/rulegraph.png").is_file()
