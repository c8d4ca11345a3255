"""The report stage: tables, figures, summary.json and their provenance.

The first group reads the outputs of the session's micro pipeline run (conftest.micro_run);
the rest are fast unit tests of the pieces.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_snakemake
from defectfusion.cli import main
from defectfusion.core.errors import UserError
from defectfusion.report import FIGURES, TABLES, Layout, inputs_of
from defectfusion.report import provenance as prov

SHA = re.compile(r"^[0-9a-f]{64}$")
# The micro profile's Phase 2 variants (configs/micro.yaml runs a subset of params.yaml's).
VARIANTS = ("zero_start", "frozen0", "deimv2_loss", "thesis_replica")


def _outputs() -> list[tuple[str, str]]:
    """(file, rule) of every table and figure."""
    tables = [(f"results/tables/{t}.{e}", "table") for t in TABLES for e in ("csv", "md", "tex")]
    figures = [(f"figures/{f}.{e}", "figure") for f in FIGURES for e in ("png", "pdf")]
    return tables + figures


# ---- on the micro pipeline's outputs --------------------------------------------------------


@pytest.mark.slow
def test_every_table_and_figure_exists_with_its_provenance(micro_run: Path) -> None:
    for rel, rule in _outputs():
        path = micro_run / rel
        assert path.is_file() and path.stat().st_size > 0, rel
        record = prov.read_embedded(path)
        kind = "tables" if rule == "table" else "figures"
        assert record["name"] == f"{kind}/{Path(rel).stem}", rel
        assert record["rule"] == rule, rel
        assert "commit" in record and SHA.match(record["params_sha256"]), rel
        assert record["inputs"] or rel.startswith("results/tables/environment."), rel
        # The recorded hashes are those of the files the output was made from.
        for inp, digest in record["inputs"].items():
            assert prov.sha256_file(micro_run / inp) == digest, (rel, inp)


def test_the_thesis_beside_this_run_reads_the_results(micro_run: Path) -> None:
    """The side-by-side table: the thesis's figures from thesis/thesis_figures.yaml, this
    run's from the post-mortem, and their ratio."""
    import csv

    from defectfusion.config import read_yaml

    text = (micro_run / "results" / "tables" / "thesis_vs_run.csv").read_text(encoding="utf-8")
    rows = {r["Figure"]: r for r in csv.DictReader(ln for ln in text.splitlines() if ln[:1] != "#")}
    pm = json.loads((micro_run / "results" / "postmortem.json").read_text())
    thesis = read_yaml(micro_run / "thesis" / "thesis_figures.yaml")
    p1 = rows["Phase 1 val mAP"]
    assert float(p1["Thesis"]) == thesis["map_phase1"]["value"]
    assert float(p1["This run"]) == pytest.approx(pm["phase1"]["val"]["map"]["value"])
    assert float(p1["Run / thesis"]) == pytest.approx(float(p1["This run"]) / float(p1["Thesis"]))
    drop = rows["epoch-1 change (epoch 1 - Phase 1)"]
    assert float(drop["Thesis"]) == pytest.approx(pm["thesis"]["drop"])
    assert float(drop["This run"]) == pytest.approx(
        pm["phase2"]["zero_start"]["drift"]["epoch1"]["val"]["map"]["diff"]
    )
    assert "{tesis}`map_phase1`" in (micro_run / "results/tables/thesis_vs_run.md").read_text()
    # the losses sum different terms with different weights: beside each other, no ratio
    loss = rows["Phase 2 training loss, epoch 1"]
    assert loss["This run"] and loss["Run / thesis"] == ""


def test_random_weights_are_never_called_dinov3(micro_run: Path) -> None:
    """The micro profile's backbones start from random weights (model.init: scratch): the
    tables name the architecture and say so ("ViT, pesos aleatorios"), never "DINOv3", which
    names pretrained weights. The settings and recipe tables quote the thesis's DINOv3."""
    tables = micro_run / "results" / "tables"
    for name in ("phase1", "phase1_detail", "per_class_recall", "phase2", "runtime"):
        text = (tables / f"{name}.md").read_text(encoding="utf-8")
        assert "DINOv3" not in text, name
    assert "ViT, pesos aleatorios (principal)" in (tables / "phase1.md").read_text("utf-8")


def test_every_figure_is_legible_at_print_size(micro_run: Path) -> None:
    """Each figure's smallest text, as printed at the PDF's column width (a figure wider than
    the column is scaled down with its fonts), is at least 8 pt: the value the figure writer
    measured on the drawn figure and recorded."""
    from defectfusion.report import FIGURES
    from defectfusion.report.figures import MIN_PRINT_PT

    small = {}
    for name in FIGURES:
        record = prov.read_embedded(micro_run / "figures" / f"{name}.png")
        pt = record["smallest_text_pt"]
        if pt is not None and pt < MIN_PRINT_PT:
            small[name] = pt
    assert not small, f"text below {MIN_PRINT_PT} pt at the column width: {small}"


@pytest.mark.slow
def test_provenance_index_covers_every_output_with_its_hash(micro_run: Path) -> None:
    index = json.loads((micro_run / "results/provenance.json").read_text())["outputs"]
    expected = {rel for rel, _ in _outputs()} | {"results/summary.json"}
    assert set(index) == expected
    for rel, record in index.items():
        assert record["sha256"] == prov.sha256_file(micro_run / rel), rel


@pytest.mark.slow
def test_summary_has_the_schema_the_book_reads(micro_run: Path) -> None:
    s = json.loads((micro_run / "results/summary.json").read_text())
    assert set(s) == {
        "run", "dataset", "main_preset", "phase1", "phase2", "phase1_val_map_best",
        "epoch0_equals_phase1", "phase1_equal_epochs", "confusion", "contrasts", "postmortem",
        "qualitative", "similarity", "phase1_top",
        "variants_run", "reproduce",
    }  # fmt: skip
    assert s["phase1_equal_epochs"] is True  # the micro profile: 2 epochs for every preset
    # every variant params.yaml defines, and whether this (micro) run trained it
    assert {v for v, ran in s["variants_run"].items() if ran} == set(VARIANTS)
    assert s["variants_run"]["naive"] is False
    k = len(s["dataset"]["classes"]) + 1  # the classes and the background
    for model in ("phase1", "phase2"):
        m, boxes = s["confusion"][model]["fraction"], s["confusion"][model]["boxes"]
        assert len(m) == len(boxes) == k and all(len(row) == k for row in m)
        assert all(abs(sum(row) - (n > 0)) < 1e-9 for row, n in zip(m, boxes, strict=True))
    assert set(s["run"]) == {"commit", "params_sha256", "date", "machine", "profile", "profile_es",
                             "phase1_lr", "phase2_lr", "lr_fraction", "phase2_epochs"}  # fmt: skip
    assert s["run"]["lr_fraction"] == s["run"]["phase2_lr"] / s["run"]["phase1_lr"]
    assert s["run"]["profile"] == "micro" and SHA.match(s["run"]["params_sha256"])
    assert set(s["dataset"]) == {
            "name", "synthetic", "classes", "n_classes", "critical_classes", "n_images", "n_boxes"
        }  # fmt: skip
    assert s["dataset"]["synthetic"] is True  # the micro profile generates its data
    assert s["dataset"]["critical_classes"] == ["fracture", "scratch", "contamination"]
    assert set(s["dataset"]["n_images"]) == {"train", "val", "test"}
    assert s["dataset"]["n_images"]["test"] == 12  # configs/micro.yaml
    assert s["main_preset"] == "deimv2-dinov3-tiny"
    p1_keys = {
        "map", "map50", "map75", "critical_recall", "critical_recall50", "composite",
        "parameters", "best_epoch", "epochs", "train_seconds", "per_class", "plateau",
    }  # fmt: skip
    assert len(s["phase1"]) == 3
    for entry in s["phase1"].values():
        assert set(entry) == p1_keys
        assert set(entry["plateau"]) == {
            "gain", "from_epoch", "to_epoch", "min_gain", "reached", "judged",
        }  # fmt: skip
        assert set(entry["per_class"]) == set(s["dataset"]["classes"])
        assert isinstance(entry["parameters"], int) and entry["parameters"] > 0
    p2_keys = {
        "seeds", "n_seeds", "map", "map50", "map75", "critical_recall", "critical_recall50", "composite",
        "max_correction", "loss_change", "epoch0_val_map", "epoch1_val_map", "best_epoch", "val_map_by_epoch", "alpha_final",
        "tau_final", "alpha_by_seed_es", "alpha_best_by_seed_es", "alpha_signs_agree", "diff_map", "ci_map", "diff_critical_recall", "ci_critical_recall",
        "frac_b_gt_a_map", "drift", "verdict", "operating_point", "mechanism",
        "trainable_parameters",
    }  # fmt: skip
    assert set(s["phase2"]) == set(VARIANTS)
    for name, entry in s["phase2"].items():
        # every control is also compared with the adopted variant
        assert set(entry) == p2_keys | ({"vs_adopted"} if name != "zero_start" else set())
        assert entry["seeds"] == [0] and entry["n_seeds"] == 1
        # derived in the summary, so the book only looks it up: |alpha| / tau
        assert entry["max_correction"] == abs(entry["alpha_final"]) / entry["tau_final"]
        assert len(entry["ci_map"]) == 2 and len(entry["ci_critical_recall"]) == 2
        assert entry["val_map_by_epoch"][0] == entry["epoch0_val_map"]
    assert s["phase2"]["frozen0"]["alpha_final"] == 0.0  # the control's gate never moves
    assert s["phase2"]["thesis_replica"]["alpha_final"] != 0.0  # a learned gate moves
    # Zero-start before any update is the Phase 1 model: same val metrics, exactly.
    assert s["epoch0_equals_phase1"] is True
    assert s["phase2"]["zero_start"]["epoch0_val_map"] == s["phase1_val_map_best"]
    assert s["dataset"]["n_classes"] == len(s["dataset"]["classes"])
    assert s["postmortem"]["n_hypotheses"] == len(s["postmortem"]["hypotheses"]) == len(VARIANTS) - 1
    # the rule's branch and the numbers that decided it, per hypothesis (issue 23)
    assert s["postmortem"]["rule"]["n_hypotheses"] == len(VARIANTS)
    for entry in s["phase2"].values():
        vd = entry["verdict"]
        assert sum(vd[b] for b in ("reproduces", "partial", "opposite", "equivalent",
                                   "inconclusive")) == 1  # fmt: skip
        assert {"ci_adjusted", "level_adjusted", "test", "fraction_of_thesis", "within_margin",
                "equivalence_margin", "texto"} <= set(vd)  # fmt: skip
        assert entry["trainable_parameters"] > 0
        assert set(entry["mechanism"]) == {"shift_epoch0", "adaptation_epoch1", "drift_epoch1"}
    assert set(s["postmortem"]["effects"]) == {"text", "loss_switch", "head_finetuning"}


@pytest.mark.slow
def test_a_changed_result_rebuilds_only_what_reads_it(micro_run: Path) -> None:
    def planned_after_changing(rel: str) -> dict[str, int]:
        # A new mtime alone is not a change for Snakemake 9 (it compares checksums): give
        # the file new content (JSON with one more trailing newline), plan, then restore.
        path = micro_run / rel
        before, data = path.stat(), path.read_bytes()
        path.write_bytes(data + b"\n")
        now = time.time() + 5
        os.utime(path, (now, now))
        try:
            out = run_snakemake(micro_run, "-n", "--quiet", "rules")
        finally:  # the session's run must stay complete for the other tests
            path.write_bytes(data)
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert out.returncode == 0, out.stderr[-2000:]
        counts = {}
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "rule"):
                counts[parts[0]] = int(parts[1])
        return counts

    text = planned_after_changing("results/text/embeddings.json")
    # prompt_similarity, the settings table (the text encoder and D_t it names), the
    # prompts table (the descriptions it lists) and the summary (the similarities the book
    # reads out)
    assert text.get("figure") == 1 and text.get("table") == 2 and text.get("summary") == 1
    assert text.get("provenance") == 1
    compare = planned_after_changing("results/compare/frozen0_seed0.json")
    assert compare.get("table") == 1  # phase2_detail: P(ΔmAP > 0) per seed
    assert "figure" not in compare


# ---- units ----------------------------------------------------------------------------------


def test_figures_share_the_metrics_module_s_functions() -> None:
    """One row normalisation and one IoU: the figures import them (no copy to drift)."""
    from defectfusion.evaluation import metrics
    from defectfusion.report.figures import confusion, qualitative

    assert confusion.row_normalized is metrics.row_normalized
    assert qualitative.box_iou is metrics.box_iou


def _ann(i: int, image: int, cat: int, bbox: list[float]) -> dict:
    return {"id": i, "image_id": image, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3]}


def _det(image: int, cat: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image, "category_id": cat, "bbox": bbox, "score": score}


def test_qualitative_cases_pick_what_one_model_found_and_the_other_missed() -> None:
    from defectfusion.evaluation.metrics import qualitative_cases

    box = [10.0, 10.0, 20.0, 20.0]
    gt = {
        "images": [{"id": i, "width": 64, "height": 64} for i in (1, 2, 3, 4)],
        "annotations": [
            _ann(1, 1, 2, box),  # critical: B finds it, A does not
            _ann(2, 2, 2, box),  # critical: B finds it by a smaller margin
            _ann(3, 3, 3, box),  # critical: A finds it, B scores below the threshold
            _ann(4, 4, 0, box),  # not critical: never a case
        ],
    }
    a = [_det(3, 3, box, 0.9), _det(2, 2, box, 0.2), _det(4, 0, box, 0.9)]
    b = [_det(1, 2, box, 0.8), _det(2, 2, box, 0.7), _det(3, 3, box, 0.25)]
    cases = qualitative_cases(gt, a, b, critical=[2, 3, 5], score_threshold=0.3)
    assert [c["image_id"] for c in cases["b_not_a"]] == [1, 2]  # ranked by the score gap
    assert cases["b_not_a"][0]["gap"] == pytest.approx(0.8)
    assert cases["b_not_a"][1]["gap"] == pytest.approx(0.5)
    assert [c["image_id"] for c in cases["a_not_b"]] == [3]
    # A same-class detection that misses the box (IoU < 0.5) does not find it.
    shifted = [_det(1, 2, [25.0, 25.0, 20.0, 20.0], 0.99)]
    assert qualitative_cases(gt, shifted, [], [2], 0.3) == {"b_not_a": [], "a_not_b": []}


def test_every_format_carries_the_record_and_rereads_it(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from defectfusion.report.figures import save
    from defectfusion.report.tables import Col, Table, render

    src = tmp_path / "in.json"
    src.write_text('{"x": 1}')
    record = prov.make_record("figures/demo", "figure", {"eval": {"a": 1}}, [src])
    fig = Figure(figsize=(2, 1))
    fig.add_subplot().plot([0, 1], [1, 0])
    paths = save(fig, tmp_path, "demo", record)
    table = Table(
        "T", [Col("name", "Name", "s"), Col("v", "ΔmAP", "+3")], [{"name": "a_b", "v": 0.5}], ["n"]
    )
    for ext, text in render(table, record).items():
        (tmp_path / f"t.{ext}").write_text(text)
        paths.append(tmp_path / f"t.{ext}")
    for path in paths:
        assert prov.read_embedded(path) == record, path
    assert record["inputs"] == {str(src): prov.sha256_file(src)}
    # Same record and drawing: byte-identical files (no timestamp anywhere).
    first = [p.read_bytes() for p in paths[:2]]
    save(fig, tmp_path, "demo", record)
    assert [p.read_bytes() for p in paths[:2]] == first


def test_tables_render_null_blank_and_latex_symbols() -> None:
    from defectfusion.report.tables import Col, Table, render

    cols = [
        Col("m", "Model", "s"),
        Col("d", "ΔmAP", "+3"),
        Col("ci", "CI", "ci"),
        Col("p", "P", "%"),
    ]
    rows = [
        {"m": "ref", "d": "", "ci": "", "p": ""},
        {"m": "x_y†", "d": None, "ci": [-0.01, 0.02], "p": 0.5},
    ]
    out = render(Table("t", cols, rows, []), prov.make_record("tables/t", "r", {}, []))
    md = out["md"].splitlines()
    assert md[-2].split("|")[2].strip() == ""  # not applicable: blank
    # The book's Markdown: Spanish conventions, a true minus sign, a narrow space before "%".
    assert "n/d" in md[-1] and "[\u22120.0100, +0.0200]" in md[-1] and "50\u202f%" in md[-1]
    assert "-0" not in out["md"]
    assert r"$\Delta$mAP" in out["tex"] and r"x\_y\dag{}" in out["tex"] and "50\\%" in out["tex"]
    assert "Δ" not in out["tex"].split("\n", 2)[2]  # only the comment lines keep UTF-8
    assert out["csv"].splitlines()[-1] == 'x_y†,,"[-0.01, 0.02]",0.5'


def test_a_missing_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="results/phase1/x/history.jsonl: not found"):
        prov.make_record("figures/f", "figure", {}, ["results/phase1/x/history.jsonl"])


def test_index_maps_each_output_to_its_record(tmp_path: Path) -> None:
    out = tmp_path / "fig.png"
    out.write_bytes(b"png")
    record = prov.make_record("figures/fig", "figure", {}, [])
    sidecar = prov.write_sidecar(tmp_path / "results", record, [out])
    index = prov.build_index([sidecar], tmp_path / "provenance.json")
    assert index["outputs"][str(out)] == {**record, "sha256": prov.sha256_file(out)}
    assert json.loads((tmp_path / "provenance.json").read_text()) == index


def test_layout_names_every_output_and_refuses_unknown_ones() -> None:
    values = {
        "data": {"dir": "data/d"},
        "model": {"preset": "p"},
        "pipeline": {
            "presets": ["p", "q"],
            "variants": ["zero_start", "naive"],
            "seeds": [0, 1],
        },
    }
    layout = Layout.from_config(values)
    assert layout.adopted == ("zero_start", 0)
    for kind, names in (("tables", TABLES), ("figures", FIGURES), ("summary", ("summary",))):
        for name in names:
            files = inputs_of(layout, kind, name)
            assert files == sorted(set(files)) and files
            assert all(
                f.startswith(("results/", "data/d/"))
                or f in ("thesis/thesis_figures.yaml", "thesis/deimv2_recipe.yaml", "requirements.lock")
                for f in files
            ), (name, files)
    assert "results/phase2/naive/seed1/steps.jsonl" in inputs_of(layout, "figures", "gate_dynamics")
    with pytest.raises(KeyError):
        inputs_of(layout, "figures", "nope")


def test_summary_helpers() -> None:
    from defectfusion.report.summary import best_row, ci_envelope, mean

    history = [{"epoch": 0}, {"epoch": 1, "best": True}, {"epoch": 2, "best": False}]
    assert best_row(history)["epoch"] == 1
    with pytest.raises(UserError, match="no epoch marked best"):  # epoch 0 is never selected
        best_row([{"epoch": 0}, {"epoch": 1, "best": False}])
    with pytest.raises(UserError):
        best_row([{"epoch": 1, "best": False}])
    assert ci_envelope([[-0.1, 0.2], [-0.3, 0.1]]) == [-0.3, 0.2]
    assert mean([1.0, None, 3.0]) == 2.0 and mean([None]) is None


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    assert (
        main(
            ["report", "figures", "--config", str(params), "--out", str(tmp_path), "--only", "nope"]
        )
        == 2
    )
    assert "unknown figure 'nope'" in capsys.readouterr().err
    cwd = os.getcwd()
    os.chdir(tmp_path)  # no results here
    try:
        code = main(
            ["report", "tables", "--config", str(params), "--out", "t", "--only", "dataset"]
        )
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert (
        code == 2 and err.count("\n") == 1 and "data/synth/annotations/test.json: not found" in err
    )


@pytest.mark.parametrize(
    ("style", "message"),
    [
        ({"nope": {}}, "figure_style.nope: no such figure"),
        ({"postmortem": {"lines.width": 2}}, "'lines.width' is not a matplotlib rcParam"),
        ({"postmortem": {"lines.linewidth": "thick"}}, "figure_style.postmortem.lines.linewidth"),
        ({"postmortem": 3}, "expected a mapping"),
    ],
)
def test_a_bad_figure_style_is_named(style: dict, message: str) -> None:
    from defectfusion.report.figures import figure_styles

    with pytest.raises(UserError, match=re.escape(message)):
        figure_styles({"figure_style": style})


def test_a_figure_style_changes_that_figure(micro_run: Path, tmp_path: Path) -> None:
    import shutil

    from PIL import Image

    work = tmp_path / "work"  # a copy: the session's run must stay as it is
    shutil.copytree(micro_run, work, ignore=shutil.ignore_patterns("runs", ".snakemake"))
    cwd, hashes = os.getcwd(), []
    os.chdir(work)
    try:
        for sub, extra in (
            ("plain", []),
            ("styled", ["--set", "figure_style={postmortem: {figure.facecolor: '#ff0000'}}"]),
        ):
            args = ["report", "figures", "--config", "params.yaml", "configs/micro.yaml", *extra]
            assert main([*args, "--out", sub, "--only", "postmortem"]) == 0
            sidecar = work / "results/provenance/figures/postmortem.json"
            hashes.append(json.loads(sidecar.read_text())["params_sha256"])
    finally:
        os.chdir(cwd)
    plain = np.asarray(Image.open(work / "plain/postmortem.png").convert("RGB"))
    styled = np.asarray(Image.open(work / "styled/postmortem.png").convert("RGB"))
    assert (plain[0, 0] == 255).all() and tuple(styled[0, 0]) == (255, 0, 0)
    assert hashes[0] != hashes[1]  # the provenance records the style


def test_book_tables_print_spanish_numbers() -> None:
    """The Markdown the book includes: decimal point, narrow space from five digits on, U+2212,
    no negative zero; the CSV keeps full precision and the English conventions."""
    from defectfusion.report.tables import fmt_es

    assert fmt_es(812841, "d") == "812\u202f841" and fmt_es(2291, "d") == "2291"
    # differences and their intervals: 4 signed decimals, so a small one keeps its sign
    assert fmt_es(-0.0123, "+3") == "\u22120.0123" and fmt_es(-0.00004, "+3") == "0.0000"
    assert fmt_es(-0.0007, "+3") == "\u22120.0007"
    assert fmt_es(-0.0001, "3") == "0.000"
    assert fmt_es(-0.012, "+ci", [-0.03, 0.004]) == "\u22120.0120 [\u22120.0300, +0.0040]"
    assert fmt_es(11981.0, "0") == "11\u202f981" and fmt_es(1633.0, "0") == "1633"
    assert fmt_es(None, "3") == "n/d"


def test_class_and_model_names_are_spanish_and_colours_are_one_per_model() -> None:
    from defectfusion.report import (
        MODEL_COLORS,
        PHASE1_COLOR,
        class_name_es,
        model_color,
        variant_name_es,
    )

    assert [class_name_es(n) for n in ("fracture", "scratch", "dent", "contamination")] == [
        "Fractura",
        "Arañazo",
        "Abolladura",
        "Contaminación",
    ]
    assert variant_name_es("zero_start") == "Arranque en cero"
    assert model_color("deimv2-dinov3-tiny", "deimv2-dinov3-tiny") == PHASE1_COLOR
    assert model_color("deimv2-resnet-tiny") == MODEL_COLORS["resnet"]
    # No two models share a colour (a baseline never looks like a Phase 2 control).
    assert len(set(MODEL_COLORS.values())) == len(MODEL_COLORS)
    assert PHASE1_COLOR not in MODEL_COLORS.values()


def test_summary_says_whether_phase1_reached_its_plateau() -> None:
    """The book's limitation reads this: the log's "plateau reached/NOT reached", recomputed
    from the history with the config's settings."""
    from defectfusion.report.summary import plateau

    climbing = [{"epoch": e, "val_map": 0.1 * e} for e in range(0, 11)]
    flat = [{"epoch": e, "val_map": min(0.5, 0.1 * e)} for e in range(0, 11)]
    cfg = {"plateau_fraction": 0.2, "plateau_min_gain": 0.005}
    up = plateau(climbing, cfg)
    assert up["reached"] is False and (up["from_epoch"], up["to_epoch"]) == (8, 10)
    assert abs(up["gain"] - 0.2) < 1e-9
    assert plateau(flat, cfg)["reached"] is True
    assert plateau(climbing[:2], cfg)["reached"] is None  # one epoch: nothing to say
    # what the book branches on (a null "reached" would stop its build)
    assert plateau(climbing[:2], cfg)["judged"] is False and up["judged"] is True


@pytest.mark.parametrize("profile", ["configs/thesis.yaml", "configs/neu.yaml", None])
def test_the_gpu_profiles_follow_deimv2(profile: str | None) -> None:
    """thesis/deimv2_recipe.yaml: every DEIMv2 recipe item is aligned on the GPU profiles or
    its difference states a reason; the CPU default's differences are all explained too."""
    from defectfusion.config import deep_merge, read_yaml
    from defectfusion.report.tables import recipe_rows

    values = read_yaml("params.yaml")
    if profile:
        values = deep_merge(values, read_yaml(profile))
    rows = recipe_rows(values)
    unexplained = [r["item"] for r in rows if not r["aligned"] and not r["reason"]]
    assert not unexplained, f"{profile or 'params.yaml'}: {unexplained} differ with no reason"
    by = {r["item"]: r for r in rows}
    if profile:  # what the GPU profiles align (the rest cannot be set here, or is stated)
        for item in ("backbone_lr_mult", "warmup_shape", "min_lr_fraction", "final_fraction",
                     "ema_warmup_steps", "decoder_n_points", "mal_gamma", "flat_fraction"):  # fmt: skip
            assert by[item]["aligned"], (profile, item, by[item]["run"])
    else:
        assert not by["decoder_n_points"]["aligned"] and by["decoder_n_points"]["run"] == "[4, 4, 4]"
    # the main preset's run as it trains: a preset override counts, not only the config value
    main = values["model"]["preset"]
    values["pipeline"]["preset_overrides"] = {main: {"phase1.backbone_lr_mult": 0.123}}
    assert {r["item"]: r for r in recipe_rows(values)}["backbone_lr_mult"]["run"] == "0.123"


def test_the_gate_is_read_seed_by_seed() -> None:
    """Seeds whose gates open in opposite senses must not read as one small positive gate:
    the book prints each seed, says the signs disagree, and bounds the correction by the seed
    that opened most (their mean hid all three)."""
    from defectfusion.report.summary import _gate_by_seed

    runs = [{"last": {"alpha": a, "tau": 0.07}} for a in (0.016, 0.016, -0.016)]
    g = _gate_by_seed(runs)
    assert g["alpha_by_seed_es"] == "+0.0160, +0.0160 y \u22120.0160"
    assert g["alpha_signs_agree"] is False
    assert g["max_correction"] == pytest.approx(0.016 / 0.07)
    assert _gate_by_seed(runs[:2])["alpha_signs_agree"] is True
    # the evaluated checkpoint's gate, read from its own row (not the last step's)
    runs = [{"last": {"alpha": 0.016, "tau": 0.07}, "best": {"alpha": 0.002, "tau": 0.07}}]
    assert _gate_by_seed(runs, "best")["alpha_by_seed_es"] == "+0.0020"


def test_how_far_phase2_moved_is_its_loss_from_the_first_trained_epoch_to_the_last() -> None:
    """The book weighs "no drop" by how far Phase 2 moved the model (a reader found its loss
    change 0.1 % against the thesis's 77 %): epoch 0 only evaluates, so it has no loss."""
    from defectfusion.report.summary import _loss_change

    history = [{"epoch": 2, "loss": 9.0}, {"epoch": 0}, {"epoch": 1, "loss": 10.0}]
    assert _loss_change(history) == pytest.approx(-0.1)
    assert _loss_change([{"epoch": 0}, {"epoch": 1, "loss": 10.0}]) is None


def test_a_fall_by_the_last_epoch_is_reported_beside_the_epoch1_verdict() -> None:
    from defectfusion.report.summary import _late_drift

    def c(b: str, metric: str, which: str, diff: float) -> dict:
        return {"a": "phase1", "b": b, "metric": metric, "split": "val", "which": which,
                "diff": diff}  # fmt: skip

    sig = [
        c("zero_start", "critical_recall", "final", -0.0054),
        c("thesis_replica", "map", "final", -0.0145),
        c("clip_norm", "critical_recall", "epoch1", -0.0166),  # epoch 1: the verdict's
    ]
    # the replica's gap was there before any update: a starting gap, not a decline
    epoch0 = {"zero_start": {"critical_recall": 0.0}, "thesis_replica": {"map": -0.0130}}
    late = _late_drift(sig, "zero_start", epoch0)
    assert late["variants"] == ["zero_start", "thesis_replica"] and late["adopted"]
    assert late["sized"][1] == (
        "Réplica de la tesis (mAP \u22120.0145: \u22120.0130 en la época 0 y \u22120.0015 al entrenar)"
    )
    assert late["start_gap_names"] == ["Réplica de la tesis"] and late["n_map"] == 1
    none = _late_drift(sig[2:], "zero_start", epoch0)
    assert not none["any"] and none["n"] == 0 and none["n_start_gap"] == 0
