"""Tests of defectfusion.postmortem: drifts, contrasts and verdicts on constructed results.

The results tree is built by hand (no training): ground truth from test_compare's generator,
Phase 1 predictions that are noisy copies of it, and Phase 2 prediction sets derived from
Phase 1's by a known change (none, or a loss of true positives).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from defectfusion import cli
from defectfusion.bootstrap import verdict
from defectfusion.errors import UserError
from defectfusion.fsutil import atomic_write_json
from defectfusion.postmortem import run_postmortem, thesis_drop
from defectfusion.report import PHASE1_PREDICTIONS, PHASE2_PREDICTIONS, Layout
from test_compare import make_gt, noisy_predictions

ROOT = Path(__file__).resolve().parents[1]
MAIN = "deimv2-dinov3-tiny"
Transform = Callable[[list[dict], int, str], list[dict]]  # (Phase 1's results, seed, split)


def same(results: list[dict], seed: int, split: str) -> list[dict]:
    return copy.deepcopy(results)


def lose(fraction: float, spread: float = 0.2, fixed_seed: int | None = None) -> Transform:
    """Delete every detection of a seed-dependent share (about `fraction`) of the images:
    their boxes are missed, a sure loss of mAP. `fixed_seed`: the same images for any seed."""

    def t(results: list[dict], seed: int, split: str) -> list[dict]:
        s = seed if fixed_seed is None else fixed_seed
        rng = np.random.default_rng(100 + s)
        share = fraction * (1 + spread * (s - 1))  # seeds differ: a training variance
        images = sorted({r["image_id"] for r in results})
        gone = {i for i, g in zip(images, rng.random(len(images)) < share, strict=True) if g}
        return [copy.deepcopy(r) for r in results if r["image_id"] not in gone]

    return t


def values(data: Path, variants: dict[str, Any], seeds: list[int], n_boot: int) -> dict:
    return {
        "seed": 0,
        "data": {"dir": str(data), "critical_classes": [2, 3, 5]},
        "model": {"preset": MAIN},
        "eval": {
            "composite_weights": {"map": 0.7, "critical_recall": 0.3},
            "score_threshold": 0.3,
            "iou_match": 0.5,
        },
        "pipeline": {"variants": variants, "seeds": seeds, "bootstrap": n_boot},
    }


def make_results(
    root: Path,
    transforms: dict[str, Transform],
    seeds: list[int],
    n_images: int = 24,
    n_boot: int = 40,
    phase1: Transform = same,
) -> dict[str, Any]:
    """data/annotations/{val,test}.json and results/ as the training and evaluation jobs
    write them; returns the config dict."""
    data = root / "data"
    cfg = values(data, {v: {} for v in transforms}, seeds, n_boot)
    layout = Layout.from_config(cfg, str(root / "results"))
    for k, split in enumerate(("val", "test")):
        gt = make_gt(10 + k, n_images=n_images)
        atomic_write_json(layout.split(split), gt)
        base = noisy_predictions(gt, 10 + k)
        atomic_write_json(layout.phase1(MAIN, PHASE1_PREDICTIONS[split]), phase1(base, 0, split))
        for v, t in transforms.items():
            for s in seeds:
                for (sp, _which), name in PHASE2_PREDICTIONS.items():
                    if sp == split:
                        atomic_write_json(layout.phase2(v, s, name), t(base, s, split))
    for v in transforms:
        for s in seeds:
            rows = [{"epoch": e, "val_map": 0.5 - 0.01 * e} for e in range(3)]
            path = Path(layout.phase2(v, s, "history.jsonl"))
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return cfg


def run(tmp_path: Path, cfg: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return run_postmortem(
        cfg, tmp_path / "postmortem.json", results=str(tmp_path / "results"), **kw
    )


# ---- verdicts -----------------------------------------------------------------------------------


def test_verdict_flips_with_the_interval() -> None:
    assert verdict([-0.2, -0.01]) == "drop"
    assert verdict([0.01, 0.2]) == "rise"  # the same interval, inputs reversed
    for ci in ([-0.1, 0.1], [0.0, 0.0], [-0.1, 0.0], [0.0, 0.3]):  # contains 0: no change
        assert verdict(ci) == "no_change", ci
    assert verdict([None, None]) == "no_data"


def test_thesis_drop_is_read_from_the_thesis_figures(tmp_path: Path) -> None:
    got = thesis_drop(ROOT / "thesis/thesis_figures.yaml")
    assert got["drop"] == pytest.approx(-0.114) and "thesis_figures" in got["source"]
    # no typed copy of the thesis's numbers: a missing or incomplete file is one line
    with pytest.raises(UserError, match="none.yaml"):
        thesis_drop(tmp_path / "none.yaml")
    (tmp_path / "part.yaml").write_text("map_phase1: {value: 0.785}\n")
    with pytest.raises(UserError, match="map_epoch1_zero_start"):
        thesis_drop(tmp_path / "part.yaml")


# ---- on constructed results ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """zero_start identical to Phase 1; `broken` misses every box of about half the images."""
    tmp = tmp_path_factory.mktemp("pm")
    cfg = make_results(tmp, {"zero_start": same, "broken": lose(0.5, 0.2)}, seeds=[0, 1, 2])
    return tmp, run(tmp, cfg)


def test_schema(case: tuple[Path, dict[str, Any]]) -> None:
    tmp, pm = case
    assert json.loads((tmp / "postmortem.json").read_text()) == json.loads(json.dumps(pm))
    assert pm["n_sets"] == 2 + 2 * 3 * len(PHASE2_PREDICTIONS)
    assert pm["seeds"] == [0, 1, 2] and pm["adopted"] == "zero_start"
    assert pm["variants"] == ["zero_start", "broken"]
    assert pm["critical_classes"] == ["fracture", "scratch", "contamination"]
    assert set(pm["metrics"]) >= {
        "map", "critical_recall", "composite", "op_recall_critical", "op_recall_fracture",
        "op_recall_scratch", "op_recall_contamination",
    }  # fmt: skip
    assert set(pm["covers"]) == {"vs_phase1", "vs_adopted", "phase1_values", "phase2_values"}
    assert "Phase 1 training run" in pm["covers"]["vs_phase1"]
    assert pm["thesis"]["drop"] == pytest.approx(-0.114)
    for v in pm["variants"]:
        entry = pm["phase2"][v]
        assert set(entry) == {"values", "drift", "verdict", "history"}
        assert set(entry["drift"]) == {"best", "epoch1", "final"}
        assert set(entry["drift"]["epoch1"]) == {"val", "test"}
        assert set(entry["drift"]["best"]) == {"test"}
        d = entry["drift"]["epoch1"]["val"]["map"]
        assert {"diff", "ci", "n_seeds", "n_valid", "verdict"} <= set(d) and d["n_seeds"] == 3
        vd = entry["verdict"]
        assert vd["outcome"] in ("drop", "rise", "no_change")
        assert [vd["drop"], vd["rise"], vd["no_change"]].count(True) == 1
        assert vd["ratio_to_thesis"] == pytest.approx(vd["diff"] / pm["thesis"]["drop"])
        op = entry["values"]["best"]["test"]["op_recall_fracture"]
        assert 0 <= op["value"] <= 1 and op["ci"][0] <= op["ci"][1] and len(op["per_seed"]) == 3
    keys = {"a", "b", "metric", "split", "which", "diff", "ci", "n_seeds", "verdict", "covers"}
    assert all(keys <= set(c) for c in pm["contrasts"])
    pairs = {(c["a"], c["b"]) for c in pm["contrasts"]}
    assert pairs == {("phase1", "zero_start"), ("phase1", "broken"), ("zero_start", "broken")}
    n_metrics, n_sets = len(pm["metrics"]), len(PHASE2_PREDICTIONS)
    assert len(pm["contrasts"]) == 3 * n_metrics * n_sets
    cal = pm["calibration"]
    assert len(cal["phase1"]["test"]["critical"]) == len(cal["thresholds"])
    assert set(cal["phase2"]["broken"]) == {"best", "epoch1", "final"}
    assert set(pm["outcome"]) >= {"adopted_drop", "n_drop", "explained", "no_drop", "open"}


def test_identical_predictions_drift_by_exactly_zero(case: tuple[Path, dict[str, Any]]) -> None:
    _, pm = case
    for which, splits in pm["phase2"]["zero_start"]["drift"].items():
        for split, per_metric in splits.items():
            for m, d in per_metric.items():
                if d["diff"] is None:
                    continue
                assert d["diff"] == 0.0, (which, split, m)
                assert d["ci"] == [0.0, 0.0], (which, split, m)
                assert d["verdict"] == "no_change"
    assert pm["phase2"]["zero_start"]["verdict"]["outcome"] == "no_change"


def test_a_known_loss_is_a_drop_and_explains_the_case(case: tuple[Path, dict[str, Any]]) -> None:
    _, pm = case
    vd = pm["phase2"]["broken"]["verdict"]
    assert vd["outcome"] == "drop" and vd["drop"] and vd["diff"] < 0
    assert vd["test"] == "drop" and vd["vs_adopted"] == "drop"
    out = pm["outcome"]
    assert out["drop_variants"] == ["broken"] and out["n_drop"] == 1
    assert out["explained"] and not out["no_drop"] and not out["open"]
    assert not out["adopted_drop"]
    c = next(
        c for c in pm["contrasts"]
        if (c["a"], c["b"], c["metric"], c["split"], c["which"])
        == ("zero_start", "broken", "map", "test", "best")
    )  # fmt: skip
    assert c["verdict"] == "drop" and c["ci"][1] < 0 and c["frac_b_gt_a"] == 0.0


def test_reversed_inputs_flip_the_verdicts(tmp_path: Path) -> None:
    """Phase 1 is the damaged model and a variant the intact one: the drop becomes a rise."""
    damaged = lose(0.9, fixed_seed=0)  # about 70 % of the images lose every detection
    cfg = make_results(
        tmp_path, {"zero_start": damaged, "fixed": same}, seeds=[0, 1], phase1=damaged
    )
    pm = run(tmp_path, cfg)
    assert pm["phase2"]["zero_start"]["verdict"]["outcome"] == "no_change"
    assert pm["phase2"]["fixed"]["verdict"]["outcome"] == "rise"
    assert pm["phase2"]["fixed"]["verdict"]["rise"] and not pm["phase2"]["fixed"]["verdict"]["drop"]
    assert pm["phase2"]["fixed"]["verdict"]["vs_adopted"] == "rise"
    assert pm["outcome"]["n_drop"] == 0 and pm["outcome"]["rise_variants"] == ["fixed"]
    assert pm["outcome"]["no_drop"] and pm["outcome"]["open"]


def test_worker_processes_give_the_same_result(tmp_path: Path) -> None:
    cfg = make_results(tmp_path, {"zero_start": same, "naive": lose(0.5)}, seeds=[0, 1], n_images=8)
    one = run(tmp_path, cfg, n_boot=15)
    two = run(tmp_path, cfg, n_boot=15, jobs=2)
    for key in ("phase1", "phase2", "contrasts", "calibration", "outcome"):
        assert two[key] == one[key], key
    assert two["n_sets"] == one["n_sets"] == 2 + 2 * 2 * len(PHASE2_PREDICTIONS)
    assert two["cpu_seconds"] > 0


def test_no_drop_anywhere_leaves_the_cause_open(tmp_path: Path) -> None:
    cfg = make_results(tmp_path, {"zero_start": same, "frozen0": same}, seeds=[0], n_images=8)
    pm = run(tmp_path, cfg, n_boot=10)
    out = pm["outcome"]
    assert out["no_drop"] and out["open"] and not out["explained"] and out["n_drop"] == 0
    assert "one seed" in pm["covers"]["vs_phase1"]


def test_adopted_drop_removed_by_a_control(tmp_path: Path) -> None:
    cfg = make_results(
        tmp_path, {"zero_start": lose(0.9, 0.1), "control": same}, seeds=[0, 1], n_images=16
    )
    out = run(tmp_path, cfg)["outcome"]
    assert out["adopted_drop"] and out["removing_variants"] == ["control"]
    assert out["explained"] and not out["open"] and not out["no_drop"]


# ---- errors and the command ---------------------------------------------------------------------


def test_a_missing_prediction_set_is_a_one_line_error(tmp_path: Path) -> None:
    cfg = make_results(tmp_path, {"zero_start": same}, seeds=[0], n_images=6)
    layout = Layout.from_config(cfg, str(tmp_path / "results"))
    missing = Path(layout.phase2("zero_start", 0, PHASE2_PREDICTIONS["val", "final"]))
    missing.unlink()
    with pytest.raises(UserError, match="val_final.predictions.json: file not found"):
        run(tmp_path, cfg, n_boot=5)
    assert not (tmp_path / "postmortem.json").exists()
    with pytest.raises(UserError, match="iou_match"):
        bad = copy.deepcopy(cfg)
        bad["eval"]["iou_match"] = 0.42
        run(tmp_path, bad, n_boot=5)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_results(tmp_path, {"zero_start": same, "naive": lose(0.3)}, seeds=[0], n_images=6)
    out = tmp_path / "pm.json"

    def argv(seeds: str) -> list[str]:
        sets = [
            f"data.dir={cfg['data']['dir']}",
            f"model.preset={MAIN}",
            "pipeline.variants=[zero_start, naive]",  # a list: replaces params.yaml's
            f"pipeline.seeds={seeds}",
        ]
        return [
            "postmortem", "--config", str(ROOT / "params.yaml"), "--out", str(out),
            "--results", str(tmp_path / "results"), "--n-boot", "7",
            *(x for s in sets for x in ("--set", s)),
        ]  # fmt: skip

    assert cli.main(argv("[0]")) == 0
    pm = json.loads(out.read_text())
    assert pm["n_boot"] == 7 and pm["variants"] == ["zero_start", "naive"]
    assert "prediction sets" in capsys.readouterr().out
    assert cli.main(argv("[0, 1]")) == 2  # seed 1 was never run
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seed1" in err


# ---- summary.json and the book --------------------------------------------------------------


def test_summary_takes_the_hierarchical_intervals(case: tuple[Path, dict[str, Any]]) -> None:
    from defectfusion.report.summary import postmortem_entry, postmortem_summary

    _, pm = case
    entry = postmortem_entry(pm, "broken")
    assert entry["drift"] == pm["phase2"]["broken"]["drift"]
    assert entry["verdict"]["outcome"] == "drop"
    vs = entry["vs_adopted"]["epoch1"]["val"]["map"]
    assert vs["verdict"] == pm["phase2"]["broken"]["verdict"]["vs_adopted"]
    assert set(entry["operating_point"]) == {
        "fracture", "scratch", "contamination", "critical", "tp_score_mean",
    }  # fmt: skip
    assert "vs_adopted" not in postmortem_entry(pm, "zero_start")
    top = postmortem_summary(pm)
    assert top["contrasts"] == pm["contrasts"]
    p = top["postmortem"]
    assert p["hypotheses"] == ["broken"] and p["n_seeds"] == 3
    assert p["outcome"]["drop_names"] == ["broken"]  # no Spanish name: the id
    assert p["phase1"]["operating_point"]["critical"]["ci"][0] is not None


def fake_postmortem_keys(summary: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys the post-mortem page reads, added to a fake summary.json (the book's tests):
    every variant drifts by -0.002 [-0.01, +0.006] (no change), those in `drop` by -0.08
    [-0.12, -0.04] (a drop)."""

    def d(diff: float, ci: list[float]) -> dict[str, Any]:
        return {"diff": diff, "ci": ci, "n_seeds": 3, "verdict": verdict(ci)}

    metrics = ("map", "critical_recall", "composite", "op_recall_critical")
    sets = {"best": ("test",), "epoch1": ("val", "test"), "final": ("val", "test")}
    variants = list(summary["phase2"])
    adopted = "zero_start"
    for v, entry in summary["phase2"].items():
        down = v in drop
        one = d(-0.08, [-0.12, -0.04]) if down else d(-0.002, [-0.01, 0.006])
        block = {w: {s: dict.fromkeys(metrics, one) for s in splits} for w, splits in sets.items()}
        entry["drift"] = block
        entry["verdict"] = {
            "outcome": one["verdict"], "drop": down, "rise": False, "no_change": not down,
            "diff": one["diff"], "ci": one["ci"], "thesis_drop": -0.114,
            "ratio_to_thesis": one["diff"] / -0.114, "test": one["verdict"],
            "final": one["verdict"], "vs_adopted": None if v == adopted else one["verdict"],
        }  # fmt: skip
        if v != adopted:
            entry["vs_adopted"] = block
        entry["operating_point"] = {
            "critical": {"value": 0.5, "ci": [0.4, 0.6]},
            "tp_score_mean": 0.7,
        }
    drops = [v for v in variants if v in drop and v != adopted]
    adopted_drop = adopted in drop
    summary["contrasts"] = []
    summary["postmortem"] = {
        "adopted": adopted,
        "n_seeds": 3,
        "n_boot": 1000,
        "ci_level": 95,
        "seconds": 1.0,
        "covers": {},
        "thesis": {"drop": -0.114},
        "operating_point": {"score_threshold": 0.3, "iou": 0.5},
        "hypotheses": [v for v in variants if v != adopted],
        "outcome": {
            "adopted_drop": adopted_drop,
            "drop_variants": drops,
            "drop_names": drops,
            "n_drop": len(drops),
            "rise_variants": [],
            "rise_names": [],
            "n_rise": 0,
            "removing_variants": [],
            "removing_names": [],
            "n_removing": 0,
            "explained": bool(drops) and not adopted_drop,
            "no_drop": not drops and not adopted_drop,
            "open": not (bool(drops) and not adopted_drop),
        },  # fmt: skip
        "phase1": {
            "operating_point": {"critical": {"value": 0.6, "ci": [0.5, 0.7]}, "tp_score_mean": 0.8},
            "val_map": 0.5,
        },
    }
    return summary


ALL_VARIANTS = (
    "zero_start", "naive", "frozen0", "deimv2_loss", "bn_train", "raw_start", "clip_norm",
    "decoder_only", "thesis_replica",
)  # fmt: skip


@pytest.mark.slow
def test_the_postmortem_page_says_what_the_numbers_say(tmp_path: Path) -> None:
    """The page builds from summary keys alone, one wording per outcome."""
    import re

    from test_book import build, fake_summary

    def page(drop: tuple[str, ...], where: str) -> str:
        s = fake_summary()
        for v in ALL_VARIANTS:  # the variants the page names
            s["phase2"].setdefault(v, copy.deepcopy(s["phase2"]["zero_start"]))
        index = build(tmp_path / where, fake_postmortem_keys(s, drop))
        html = (index.parent / "postmortem.html").read_text(encoding="utf-8")
        return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html))

    calm = page((), "calm")
    assert "No hay caída que explicar en este escenario" in calm
    assert "la causa sigue abierta" in calm
    assert "Un mecanismo reproduce la caída" not in calm
    assert "la mAP no cambia" in calm and "la mAP baja" not in calm
    dropped = page(("raw_start",), "drop")
    assert "Un mecanismo reproduce la caída" in dropped
    assert "No hay caída que explicar" not in dropped
    assert "la mAP baja" in dropped


def test_the_figures_draw_from_the_results(
    case: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    import shutil

    from defectfusion.report import provenance as prov
    from defectfusion.report.figures import write_figures

    tmp, _ = case
    cfg = values(tmp / "data", {"zero_start": {}, "broken": {}}, [0, 1, 2], 40)
    layout = Layout.from_config(cfg, str(tmp / "results"))
    shutil.copy(tmp / "postmortem.json", layout.postmortem)
    names = ["postmortem_forest", "postmortem_drift"]
    written = write_figures(cfg, tmp_path, only=names, results=str(tmp / "results"))
    assert sorted(p.name for p in written) == sorted(
        f"{n}.{e}" for n in names for e in ("png", "pdf")
    )
    for p in written:
        assert p.stat().st_size > 5000, p
    record = prov.read_embedded(tmp_path / "postmortem_forest.png")
    assert list(record["inputs"]) == [layout.postmortem]
