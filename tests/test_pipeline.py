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
    from defectfusion.workflow.jobs import job_counts

    return job_counts(out.stdout)


def _micro_variants(work: Path) -> list[str]:
    from defectfusion.config import read_yaml

    return read_yaml(work / "configs/micro.yaml")["pipeline"]["variants"]


def test_micro_profile_produces_every_result(micro_run: Path) -> None:
    cfg_presets = ["deimv2-dinov3-tiny", "deimv2-resnet-tiny", "deimv2-efficientnet-tiny"]
    for preset in cfg_presets:
        metrics = json.loads((micro_run / f"results/phase1/{preset}/test_metrics.json").read_text())
        assert 0.0 <= metrics["map"] <= 1.0
    from defectfusion.config import read_yaml

    default = read_yaml(micro_run / "params.yaml")["pipeline"]
    # The default profile runs the five controls and the post-mortem's candidate causes; the
    # micro profile a subset of them (a list replaces the default's, never merges with it).
    assert len(default["variants"]) >= 9
    assert set(default["variants"]) <= set(default["variant_switches"])
    variants = _micro_variants(micro_run)
    assert 2 <= len(variants) < len(default["variants"])
    for variant in variants:
        run = micro_run / f"results/phase2/{variant}/seed0"
        history = [json.loads(r) for r in (run / "history.jsonl").read_text().splitlines()]
        assert history[0]["epoch"] == 0 and "best" not in history[0]  # logged, not selected
        for which in ("metrics", "epoch1", "final"):
            m = json.loads((run / f"test_{which}.json").read_text())
            assert 0.0 <= m["map"] <= 1.0, (variant, which)
        for name in ("val_epoch0", "val_epoch1", "val_final"):
            assert json.loads((run / f"{name}.predictions.json").read_text()), (variant, name)
        cmp = json.loads((micro_run / f"results/compare/{variant}_seed0.json").read_text())
        assert set(cmp["metrics"]) >= {"map", "critical_recall", "composite"}
    pm = json.loads((micro_run / "results/postmortem.json").read_text())
    assert set(pm["phase2"]) == set(variants)


def test_second_run_does_nothing(micro_run: Path) -> None:
    assert _planned(micro_run) == {}


def test_phase2_param_change_reruns_phase2_not_phase1(micro_run: Path) -> None:
    planned = _planned(micro_run, "--config", "phase2={'lr': 0.0001}")
    assert planned.get("phase2") == len(_micro_variants(micro_run))
    assert "phase1" not in planned and "data" not in planned and "text_embed" not in planned


def test_phase1_param_change_reruns_phase1_and_what_follows(micro_run: Path) -> None:
    planned = _planned(micro_run, "--config", "phase1={'lr': 0.002}")
    assert planned.get("phase1") == 3 and planned.get("phase2") == len(_micro_variants(micro_run))
    assert "data" not in planned


def test_restyling_one_figure_redraws_only_that_figure(micro_run: Path) -> None:
    planned = _planned(micro_run, "--config", "figure_style={'postmortem': {'lines.linewidth': 2}}")
    assert planned.get("figure") == 1
    assert not set(planned) & {"table", "summary", "phase1", "phase2", "evaluate_phase1"}
    assert set(planned) <= {"figure", "provenance", "book", "all"}


def test_a_code_change_reruns_the_steps_that_import_it(micro_run: Path) -> None:
    """Each rule's code inputs are the modules its step imports (workflow.code_deps): an edited
    augmentation module replans training, the bootstrap's CLI the comparisons, the figure
    module the figures; never the steps that do not import them. (An edit, not a touch:
    Snakemake skips an input that is newer but has the checksum it recorded.)"""
    import os

    cases = [
        ("data/loader.py", {"phase1", "phase2", "evaluate_phase1"}, {"data", "text_embed"}),
        ("analysis/compare.py", {"compare"}, {"phase1", "phase2", "evaluate_phase1", "evaluate_phase2"}),
        ("report/figures/confusion.py", {"figure"}, {"phase1", "table", "summary", "compare"}),
    ]
    # Newer than every output, however long the run took (a fixed offset from the file's own
    # time was older than the outputs of a run slower than it: a clock-dependent test).
    newest = max(p.stat().st_mtime_ns for p in micro_run.rglob("*") if p.is_file())
    for path, want, never in cases:
        f = micro_run / "code/defectfusion" / path
        st, text = f.stat(), f.read_bytes()
        try:
            f.write_bytes(text + b"\n# an edit\n")
            os.utime(f, ns=(st.st_atime_ns, newest + 10**11))
            planned = _planned(micro_run)
        finally:
            f.write_bytes(text)
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert want <= set(planned) and not never & set(planned), (path, planned)
        if path.startswith("report/figures/"):  # one module per figure: that figure alone
            assert planned["figure"] == 1 and set(planned) <= {"figure", "provenance", "book", "all"}
    assert _planned(micro_run) == {}  # back as it was


def test_the_readme_rule_graph_is_the_snakefile_s(tmp_path: Path) -> None:
    """docs/rulegraph.{dot,png} (the README's figure) must match the current Snakefile:
    regenerate with `defectfusion pipeline rulegraph` when a rule's inputs change."""
    from conftest import ROOT, copy_workflow
    from defectfusion.workflow.rulegraph import rulegraph_edges, write_rulegraph

    copy_workflow(tmp_path)
    dot, png = write_rulegraph(tmp_path / "rulegraph.png", root=tmp_path)
    nodes, edges = rulegraph_edges(dot.read_text())
    committed = rulegraph_edges((ROOT / "docs/rulegraph.dot").read_text())
    assert (nodes, edges) == committed, "docs/rulegraph.* is stale: rerun the command above"
    assert ("phase1", "phase2") in edges and ("data", "phase1") in edges
    assert png.stat().st_size > 10_000 and (ROOT / "docs/rulegraph.png").is_file()


# ---- what Snakemake is told is what every job runs with (dry runs: nothing trains) ----------


def _planned_config(workdir: Path, rule_cmd: str, *args: str):
    """The config a planned job would run with: the file its `--config` names, loaded."""
    import os
    import re
    import shlex

    from defectfusion.config import load_config

    out = subprocess.run(
        ["snakemake", "--cores", "1", "-n", "-p", "--forceall", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DEFECTFUSION_ALLOW_CPU": "1"},  # the GPU profiles, planned only
    )
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-2000:])
    line = next(ln for ln in out.stdout.splitlines() if rule_cmd in ln)
    path = re.search(r"--config (\S+)", line).group(1)
    return load_config([workdir / shlex.split(path)[0]]), line


def test_config_values_reach_the_jobs(tmp_path: Path) -> None:
    from conftest import copy_workflow

    work = copy_workflow(tmp_path)
    cfg, line = _planned_config(
        work,
        "train phase2",
        "--configfile",
        "configs/micro.yaml",
        "--config",
        "phase2={'lr': 0.000123}",
    )
    assert cfg.phase2.lr == 0.000123 and cfg.data.dir == "data/micro"
    # A profile that does not list itself anywhere is what its jobs run with too.
    (work / "configs/mine.yaml").write_text("phase2: {epochs: 7}\ndata: {dir: data/mine}\n")
    cfg, _ = _planned_config(work, "train phase2", "--configfile", "configs/mine.yaml")
    assert cfg.phase2.epochs == 7 and cfg.data.dir == "data/mine"


def test_the_readme_s_dataset_src_override_reaches_data_prepare(tmp_path: Path) -> None:
    from conftest import copy_workflow

    work = copy_workflow(tmp_path)
    src = tmp_path / "my NEU-DET"  # a space: the value must reach the shell quoted
    src.mkdir()
    cfg, line = _planned_config(
        work,
        "data prepare",
        "--configfile",
        "configs/neu.yaml",
        "--config",
        f'pipeline={{"dataset": {{"src": "{src}"}}}}',
    )
    assert cfg.pipeline.dataset.src == str(src)


def test_snakemake_report_holds_every_figure_and_table(micro_run: Path, tmp_path: Path) -> None:
    """`snakemake --report` (offline): each figure and table, with its caption."""
    import re

    from conftest import MICRO
    from defectfusion.report import FIGURES, TABLES

    # as the README writes it: no --cores (a rule's `threads: workflow.cores` once failed it)
    out = subprocess.run(
        ["snakemake", *MICRO, "--report", str(tmp_path / "report.html")],
        cwd=micro_run, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    html = (tmp_path / "report.html").read_text(encoding="utf-8", errors="replace")
    for name in (*FIGURES, *TABLES):
        assert f"{name}." in html, name
    # each output under its category, with its own caption (all sat under "Other", with one
    # generic caption, issue 28)
    from defectfusion.report import CAPTIONS

    assert set(CAPTIONS) == {*FIGURES, *TABLES}
    assert "Figures" in html and "Tables" in html
    for name in ("postmortem_mechanism", "runtime"):
        assert CAPTIONS[name].split(",")[0][:40] in html, name
    assert not re.search(r"<script[^>]+src=[\"']https?://", html)  # no remote scripts


def test_config_values_reach_the_shell_quoted(tmp_path: Path) -> None:
    """A value from a shared profile is text, never shell: `;touch` stays inside quotes."""
    import shlex

    from conftest import copy_workflow

    work = copy_workflow(tmp_path)
    evil = "data/x;touch pwned;"
    out = subprocess.run(
        ["snakemake", "--cores", "1", "-n", "-p", "--forceall", "--configfile",
         "configs/micro.yaml", "--config", f"data={{'dir': '{evil}'}}"],
        cwd=work, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if "data prepare" in ln)
    assert shlex.quote(evil) in line  # one shell word
    assert evil in shlex.split(line.split(">")[0])


def test_snakemake_lint_finds_no_value_from_outside_a_rule(tmp_path: Path) -> None:
    """Every value a shell command uses comes through the rule (input, output, params): what
    `snakemake --lint` checks. The one lint left, conda/container per rule, does not apply
    (the README's pip install is the environment)."""
    from conftest import copy_workflow

    work = copy_workflow(tmp_path)
    out = subprocess.run(
        ["snakemake", "--lint"], cwd=work, capture_output=True, text=True, timeout=600
    )
    lints = {ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("    * ")}
    assert lints, "no lint output at all: did `snakemake --lint` run?"
    assert lints == {"* Specify a conda environment or container for each rule.:"}, lints
