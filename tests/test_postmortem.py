"""Tests of defectfusion.analysis.postmortem: drifts, contrasts and verdicts on constructed results.

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
from defectfusion.analysis.bootstrap import verdict
from defectfusion.analysis.postmortem import BRANCHES, judge, run_postmortem, thesis_drop
from defectfusion.core.errors import UserError
from defectfusion.core.fsutil import atomic_write_json
from defectfusion.report import PHASE1_PREDICTIONS, PHASE2_PREDICTIONS, Layout
from test_compare import make_gt, noisy_predictions

ROOT = Path(__file__).resolve().parents[1]
MAIN = "deimv2-dinov3-tiny"
Transform = Callable[[list[dict], int, str], list[dict]]  # (Phase 1's results, seed, split)


def same(results: list[dict], seed: int, split: str) -> list[dict]:
    return copy.deepcopy(results)


def lose(
    fraction: float, spread: float = 0.2, fixed_seed: int | None = None, nested: bool = False
) -> Transform:
    """Delete every detection of a seed-dependent share (about `fraction`) of the images:
    their boxes are missed, a sure loss of mAP. `fixed_seed`: the same images for any seed;
    `nested`: the same draw for every seed, so seeds differ only by their share (a small,
    known training variance)."""

    def t(results: list[dict], seed: int, split: str) -> list[dict]:
        s = seed if fixed_seed is None else fixed_seed
        rng = np.random.default_rng(100 + (0 if nested else s))
        share = fraction * (1 + spread * (s - 1))  # seeds differ: a training variance
        images = sorted({r["image_id"] for r in results})
        gone = {i for i, g in zip(images, rng.random(len(images)) < share, strict=True) if g}
        return [copy.deepcopy(r) for r in results if r["image_id"] not in gone]

    return t


def values(data: Path, variants: dict[str, Any], seeds: list[int], n_boot: int) -> dict:
    return {
        "seed": 0,
        "data": {"dir": str(data), "critical_classes": [2, 3, 5], "image_size": 96},
        "model": {"preset": MAIN},
        "eval": {
            "composite_weights": {"map": 0.7, "critical_recall": 0.3},
            "score_threshold": 0.3,
            "iou_match": 0.5,
        },
        "pipeline": {"variants": variants, "seeds": seeds, "bootstrap": n_boot,
                     "coverage_trials": 30},  # the check runs, small
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
    p1_rows = [{"epoch": e, "val_map": 0.45 + 0.02 * e, "best": True} for e in range(1, 3)]
    p1_history = Path(layout.phase1(MAIN, "history.jsonl"))
    p1_history.write_text("".join(json.dumps(r) + "\n" for r in p1_rows), encoding="utf-8")
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
    for ci in ([-0.1, 0.1], [0.0, 0.0], [-0.1, 0.0], [0.0, 0.3]):  # contains 0: says nothing
        assert verdict(ci) == "inconclusive", ci
    assert verdict([None, None]) == "no_data"


THESIS = {"phase1": 0.785, "epoch1": 0.671, "drop": 0.671 - 0.785}
RULE = {"level": 95.0, "adjust": "bonferroni", "test_agrees": True, "min_fraction": 0.5,
        "equivalence_margin": 0.01}  # fmt: skip


def drift_of(diff: float, se: float, df: float | None = None) -> dict[str, Any]:
    seed_se = se if df is not None else 0.0  # df given: the seeds' share; else the images'
    image_se = 0.0 if df is not None else se
    return {"diff": diff, "se": se, "seed_se": seed_se, "image_se": image_se, "df": df,
            "ci": [diff - 1.96 * se, diff + 1.96 * se]}  # fmt: skip


@pytest.mark.parametrize(
    ("val", "test", "branch"),
    [
        (drift_of(-0.10, 0.01), drift_of(-0.09, 0.01), "reproduces"),  # 14 %: 98 % of the thesis's
        (drift_of(-0.02, 0.004), drift_of(-0.02, 0.004), "partial"),  # 20 % of its size
        (drift_of(0.05, 0.01), drift_of(0.04, 0.01), "opposite"),
        (drift_of(0.001, 0.001), drift_of(0.0, 0.001), "equivalent"),  # inside +-0.01
        (drift_of(-0.02, 0.02), drift_of(-0.02, 0.02), "inconclusive"),  # wide, contains 0
        (drift_of(-0.10, 0.01), drift_of(-0.01, 0.02), "inconclusive"),  # test disagrees
        (drift_of(-0.10, 0.01), drift_of(0.05, 0.01), "inconclusive"),  # test opposes
        (drift_of(-0.10, 0.02, df=2.0), drift_of(-0.10, 0.01), "inconclusive"),  # t(2): wide
    ],
)
def test_each_branch_of_the_rule(val: dict, test: dict, branch: str) -> None:
    from defectfusion.report.summary import verdict_words_es

    got = judge(val, test, 0.7, THESIS, RULE, n_hypotheses=9)
    assert got["branch"] == branch and got[branch]
    assert sum(got[b] for b in BRANCHES) == 1
    assert got["level_adjusted"] == pytest.approx(100 - 5 / 9)
    words = {"reproduces": "reproduce la caída de la tesis", "partial": "baja la mAP en la "
             "dirección de la tesis", "opposite": "va en contra de la tesis",
             "equivalent": "no mueve la mAP a efectos prácticos",
             "inconclusive": "no es concluyente"}  # fmt: skip
    texto = verdict_words_es(got)
    assert texto.startswith(words[branch]) and "99.44\u202f%" in texto  # the adjusted level


def test_the_adjustment_and_the_declared_values_decide() -> None:
    """An interval that excludes 0 at 95 % but not at the Bonferroni level of 9 hypotheses is
    no finding; with `adjust: none` it is. The size and the margin come from the rule."""
    val = drift_of(-0.02, 0.0095)  # z = 2.1: 95 % excludes 0, 99.44 % does not
    assert judge(val, val, 0.7, THESIS, RULE, 9)["branch"] == "inconclusive"
    assert judge(val, val, 0.7, THESIS, {**RULE, "adjust": "none"}, 9)["branch"] == "partial"
    assert judge(val, val, 0.7, THESIS, {**RULE, "adjust": "none", "min_fraction": 0.1}, 9)[
        "branch"
    ] == "reproduces"
    tiny = drift_of(0.0, 0.003)
    assert judge(tiny, tiny, 0.7, THESIS, RULE, 9)["branch"] == "equivalent"
    assert judge(tiny, tiny, 0.7, THESIS, {**RULE, "equivalence_margin": 0.005}, 9)[
        "branch"
    ] == "inconclusive"
    no_test = {**RULE, "adjust": "none", "test_agrees": False}
    assert judge(val, drift_of(0.0, 0.1), 0.7, THESIS, no_test, 9)["branch"] == "partial"


def test_thesis_drop_is_read_from_the_thesis_figures(tmp_path: Path) -> None:
    got = thesis_drop(ROOT / "thesis/thesis_figures.yaml")
    assert got["drop"] == pytest.approx(-0.114) and "thesis_figures" in got["source"]
    # no typed copy of the thesis's numbers: a missing or incomplete file is one line
    with pytest.raises(UserError, match="none.yaml"):
        thesis_drop(tmp_path / "none.yaml")
    (tmp_path / "part.yaml").write_text("map_phase1: {value: 0.785}\n")
    with pytest.raises(UserError, match="map_epoch1_zero_start"):
        thesis_drop(tmp_path / "part.yaml")
    # a rise, or a zero Phase 1, cannot size a drop (the rule divides by both)
    (tmp_path / "rise.yaml").write_text(
        "map_phase1: {value: 0.5}\nmap_epoch1_zero_start: {value: 0.6}\n"
    )
    with pytest.raises(UserError, match="below it"):
        thesis_drop(tmp_path / "rise.yaml")


# ---- on constructed results ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """zero_start identical to Phase 1; `broken` misses every box of about 60 % of the images."""
    tmp = tmp_path_factory.mktemp("pm")
    broken = lose(0.6, 0.05, nested=True)
    cfg = make_results(tmp, {"zero_start": same, "broken": broken}, seeds=[0, 1, 2], n_images=160)
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
        assert set(entry) == {"values", "drift", "verdict", "mechanism", "history"}
        assert set(entry["drift"]) == {"best", "epoch0", "epoch1", "final"}
        assert set(entry["drift"]["epoch0"]) == {"val"}
        assert set(entry["drift"]["epoch1"]) == {"val", "test"}
        assert set(entry["drift"]["best"]) == {"test"}
        d = entry["drift"]["epoch1"]["val"]["map"]
        assert {"diff", "ci", "n_seeds", "n_valid", "verdict"} <= set(d) and d["n_seeds"] == 3
        vd = entry["verdict"]
        assert vd["branch"] in BRANCHES and [vd[b] for b in BRANCHES].count(True) == 1
        assert vd["ratio_to_thesis"] == pytest.approx(vd["diff"] / pm["thesis"]["drop"])
        assert vd["level_adjusted"] == pytest.approx(100 - 5 / 2)  # two hypotheses
        lo, hi = vd["ci_adjusted"]
        assert lo <= vd["ci"][0] and vd["ci"][1] <= hi  # adjusted: wider
        assert {"diff", "ci_adjusted", "agrees"} <= set(vd["test"])
        assert vd["fraction_of_thesis"] == pytest.approx(
            vd["diff"] / pm["phase1"]["val"]["map"]["value"] / vd["thesis_relative"]
        )
        mech = entry["mechanism"]
        assert mech["shift_epoch0"]["diff"] + mech["adaptation_epoch1"]["diff"] == pytest.approx(
            mech["drift_epoch1"]["diff"]
        )
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
    assert set(cal["phase2"]["broken"]) == {"best", "epoch0", "epoch1", "final"}
    assert set(pm["outcome"]) >= {
        "adopted_branch", "adopted_drop", "n_reproduces", "n_partial", "explained", "no_drop",
        "open",
    }  # fmt: skip
    assert pm["rule"]["n_hypotheses"] == 2 and pm["rule"]["adjust"] == "bonferroni"
    assert pm["factorial"] is None  # the run has no factorial cells


def test_identical_predictions_drift_by_exactly_zero(case: tuple[Path, dict[str, Any]]) -> None:
    _, pm = case
    for which, splits in pm["phase2"]["zero_start"]["drift"].items():
        for split, per_metric in splits.items():
            for m, d in per_metric.items():
                if d["diff"] is None:
                    continue
                assert d["diff"] == 0.0, (which, split, m)
                assert d["ci"] == [0.0, 0.0], (which, split, m)
                assert d["verdict"] == "inconclusive"
    assert pm["phase2"]["zero_start"]["verdict"]["branch"] == "equivalent"


def test_a_known_loss_is_a_drop_and_explains_the_case(case: tuple[Path, dict[str, Any]]) -> None:
    _, pm = case
    vd = pm["phase2"]["broken"]["verdict"]
    assert vd["branch"] == "reproduces" and vd["reproduces"] and vd["diff"] < 0
    assert vd["test"]["agrees"] and vd["vs_adopted"]["verdict"] == "drop"
    assert vd["fraction_of_thesis"] >= 0.5
    out = pm["outcome"]
    assert out["reproduces_variants"] == ["broken"] and out["n_reproduces"] == 1
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
        tmp_path, {"zero_start": damaged, "fixed": same}, seeds=[0, 1], phase1=damaged,
        n_images=60,
    )  # fmt: skip
    pm = run(tmp_path, cfg)
    assert pm["phase2"]["zero_start"]["verdict"]["branch"] == "equivalent"
    assert pm["phase2"]["fixed"]["verdict"]["branch"] == "opposite"
    assert pm["phase2"]["fixed"]["verdict"]["vs_adopted"]["verdict"] == "rise"
    assert pm["outcome"]["n_reproduces"] == 0 and pm["outcome"]["opposite_variants"] == ["fixed"]
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
    assert out["no_drop"] and out["open"] and not out["explained"] and out["n_reproduces"] == 0
    assert "one seed" in pm["covers"]["vs_phase1"]


def test_adopted_drop_removed_by_a_control(tmp_path: Path) -> None:
    cfg = make_results(
        tmp_path, {"zero_start": lose(0.8, 0.05, nested=True), "control": same}, seeds=[0, 1, 2],
        n_images=60,
    )
    out = run(tmp_path, cfg)["outcome"]
    assert out["adopted_branch"] == "reproduces" and out["adopted_drop"]
    assert out["removing_variants"] == ["control"]
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
    assert entry["verdict"]["branch"] == "reproduces"
    assert entry["verdict"]["texto"].startswith("reproduce la caída de la tesis")
    assert "\u2212" in entry["verdict"]["texto"]  # numbers as the book prints them
    assert entry["mechanism"] == pm["phase2"]["broken"]["mechanism"]
    vs = entry["vs_adopted"]["epoch1"]["val"]["map"]
    assert vs["diff"] == pm["phase2"]["broken"]["verdict"]["vs_adopted"]["diff"]
    assert set(entry["operating_point"]) == {
        "fracture", "scratch", "contamination", "critical", "tp_score_mean",
    }  # fmt: skip
    assert "vs_adopted" not in postmortem_entry(pm, "zero_start")
    top = postmortem_summary(pm)
    assert top["contrasts"] == pm["contrasts"]
    p = top["postmortem"]
    assert p["hypotheses"] == ["broken"] and p["n_seeds"] == 3
    assert p["outcome"]["reproduces_names"] == ["broken"]  # no Spanish name: the id
    assert p["rule"]["n_hypotheses"] == 2 and not p["has_factorial"]
    assert p["phase1"]["operating_point"]["critical"]["ci"][0] is not None


def test_the_rule_says_what_it_could_see(case: tuple[Path, dict[str, Any]]) -> None:
    """The post-mortem checks its interval's coverage at this run's design (3 seeds, the val
    images, its replicates, 95 % and the adjusted level), and the summary states the rule's
    power: the drop each hypothesis would be declared for in about 80 % of runs, beside the
    smallest drop the rule calls a reproduction. Significant contrasts say whether they hold
    with Bonferroni over every reported contrast."""
    from defectfusion.analysis.bootstrap import detectable_drop
    from defectfusion.report.summary import family_level, postmortem_summary, reported

    _, pm = case
    cov = pm["coverage"]
    assert cov["n_seeds"] == 3 and cov["n_images"] == 160 and cov["n_boot"] == 40
    assert cov["levels"] == [95.0, pytest.approx(97.5)] and len(cov["rows"]) == 8
    assert isinstance(cov["covers"], bool) and cov["trials"] == 30
    vd = pm["phase2"]["broken"]["verdict"]
    spread = pm["phase2"]["broken"]["drift"]["epoch1"]["val"]["map"]
    assert vd["detectable_drop"] == pytest.approx(detectable_drop(spread, vd["level_adjusted"]))
    half = (vd["ci_adjusted"][1] - vd["ci_adjusted"][0]) / 2
    assert vd["detectable_drop"] > half  # 80 % power asks more than the half-width
    assert vd["reproduce_threshold"] == pytest.approx(
        0.5 * 0.114 / 0.785 * pm["phase1"]["val"]["map"]["value"], rel=1e-3
    )
    p = postmortem_summary(pm)["postmortem"]
    assert p["power"]["known"] and p["power"]["worst"] == "broken"
    assert p["power"]["detectable_max"] == pytest.approx(vd["detectable_drop"])
    assert p["power"]["powered"] == (vd["detectable_drop"] <= vd["reproduce_threshold"])
    assert p["coverage"]["known"] and p["coverage"]["n_seeds"] == 3
    n = sum(reported(c) for c in pm["contrasts"])
    assert p["level_all"] == pytest.approx(family_level(pm)) == pytest.approx(100 - 5 / n)
    assert 0 <= p["n_significant_all"] <= p["n_significant"]
    off = copy.deepcopy(pm)
    off["coverage"] = None
    assert postmortem_summary(off)["postmortem"]["coverage"] == {
        "known": False, "covers": False, **dict.fromkeys((
            "n_seeds", "n_images", "n_boot", "trials", "min_95", "min_adjusted",
            "level_adjusted", "spread_min", "spread_max"))}  # fmt: skip


def fake_postmortem_keys(summary: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys the post-mortem page reads, added to a fake summary.json (the book's tests):
    every variant drifts by -0.001 (SE 0.001: equivalent, "no change"), those in `drop` by
    -0.10 (SE 0.01, Phase 1 at 0.7: reproduces the thesis's drop). Verdicts, words and the
    outcome come from the real rule (postmortem.judge, summary.verdict_words_es, _outcome)."""
    import dataclasses

    from defectfusion.analysis.postmortem import _outcome
    from defectfusion.config import PostmortemSection
    from defectfusion.report.summary import postmortem_summary, verdict_words_es

    def d(diff: float, se: float) -> dict[str, Any]:
        ci = [diff - 1.96 * se, diff + 1.96 * se]
        return {"diff": diff, "ci": ci, "se": se, "seed_se": 0.0, "image_se": se, "df": None,
                "n_seeds": 3, "verdict": verdict(ci)}  # fmt: skip

    rule = dataclasses.asdict(PostmortemSection())
    metrics = ("map", "critical_recall", "composite", "op_recall_critical")
    sets = {"best": ("test",), "epoch0": ("val",), "epoch1": ("val", "test"),
            "final": ("val", "test")}  # fmt: skip
    variants = list(summary["phase2"])
    adopted = "zero_start"
    p2: dict[str, Any] = {}
    for v, entry in summary["phase2"].items():
        one = d(-0.10, 0.01) if v in drop else d(-0.001, 0.001)
        block = {w: {s: dict.fromkeys(metrics, one) for s in splits} for w, splits in sets.items()}
        vd = judge(one, one, 0.7, THESIS, rule, len(variants))
        vd["vs_adopted"] = None if v == adopted else {"verdict": "inconclusive", "diff": 0.0}
        vd["final"] = one["verdict"]
        entry["drift"] = block
        entry["verdict"] = {**vd, "texto": verdict_words_es(vd)}
        entry["mechanism"] = {k: one for k in ("shift_epoch0", "adaptation_epoch1", "drift_epoch1")}
        p2[v] = {"verdict": vd}
        if v != adopted:
            entry["vs_adopted"] = block
        entry["operating_point"] = {
            "critical": {"value": 0.5, "ci": [0.4, 0.6]},
            "tp_score_mean": 0.7,
        }
    effect = {w: {s: dict.fromkeys(metrics, d(0.001, 0.002)) for s in splits}
              for w, splits in sets.items()}  # fmt: skip
    pm = {
        "adopted": adopted, "seeds": [0, 1, 2], "n_boot": 1000, "ci_level": 95, "seconds": 1.0,
        "covers": {}, "thesis": THESIS, "contrasts": [],
        "rule": {**rule, "n_hypotheses": len(variants), "level_each": 99.4,
                 "thesis_relative": THESIS["drop"] / THESIS["phase1"]},
        "effects": {k: {"b": "x", "a": "y", **effect} for k in ("text", "loss_switch",
                                                             "head_finetuning")},
        "factorial": None, "operating_point": {"score_threshold": 0.3, "iou": 0.5},
        "variants": variants, "outcome": _outcome(p2, adopted),
        "phase1": {"test": {"op_recall_critical": {"value": 0.6, "ci": [0.5, 0.7]}},
                   "val": {"map": {"value": 0.5}}},
        "calibration": {"phase1": {"test": {"tp_score_mean": 0.8}}},
    }  # fmt: skip
    summary.update(postmortem_summary(pm))
    summary["variants_run"] = dict.fromkeys(variants, True)
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

    def page(drop: tuple[str, ...], where: str, late: dict[str, Any] | None = None) -> str:
        s = fake_summary()
        for v in ALL_VARIANTS:  # the variants the page names
            s["phase2"].setdefault(v, copy.deepcopy(s["phase2"]["zero_start"]))
        s = fake_postmortem_keys(s, drop)
        if late is not None:
            s["postmortem"]["late"] = late
        index = build(tmp_path / where, s)
        html = (index.parent / "postmortem.html").read_text(encoding="utf-8")
        return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html))

    calm = page((), "calm")
    assert "No se reproduce la caída de la época 1" in calm
    assert "Al final del entrenamiento, diferencias pequeñas" not in calm  # nothing falls
    assert "la causa sigue abierta" in calm
    assert "Un mecanismo reproduce" not in calm
    assert "esta hipótesis no mueve la mAP a efectos prácticos" in calm
    assert "reproduce la caída de la tesis: en validación" not in calm
    dropped = page(("raw_start",), "drop")
    assert "Un mecanismo reproduce, en esta ejecución, una caída del tamaño" in dropped
    assert "No se reproduce la caída de la época 1" not in dropped
    assert "esta hipótesis reproduce la caída de la tesis: en validación" in dropped
    # a fall by the last epoch, which the epoch-1 rule does not judge, is still reported
    late = {"any": True, "n": 1, "variants": ["zero_start"], "adopted": True, "n_map": 1,
            "n_critical_recall": 0, "n_start_gap": 0, "start_gap_names": [],
            "sized": ["Arranque en cero (mAP −0.0100)"]}  # fmt: skip
    later = page((), "late", late)
    assert "Al final del entrenamiento, diferencias pequeñas" in later
    assert "Arranque en cero (mAP −0.0100)" in later


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
    names = ["postmortem_forest", "postmortem_drift", "postmortem_mechanism"]
    written = write_figures(cfg, tmp_path, only=names, results=str(tmp / "results"))
    assert sorted(p.name for p in written) == sorted(
        f"{n}.{e}" for n in names for e in ("png", "pdf")
    )
    for p in written:
        assert p.stat().st_size > 5000, p
    record = prov.read_embedded(tmp_path / "postmortem_forest.png")
    assert list(record["inputs"]) == [layout.postmortem]


@pytest.mark.parametrize(
    ("adopted", "controls", "explained", "removing"),
    [
        ("partial", {"c": ("reproduces", None)}, True, []),  # the control explains it
        ("partial", {"c": ("equivalent", "rise")}, False, ["c"]),  # removes a partial drop
        ("reproduces", {"c": ("partial", "inconclusive")}, False, []),  # nothing removes it
        ("reproduces", {"c": ("equivalent", "rise")}, True, ["c"]),
        ("equivalent", {"c": ("inconclusive", "inconclusive")}, False, []),
    ],
)
def test_the_outcome_follows_the_branches(
    adopted: str, controls: dict, explained: bool, removing: list
) -> None:
    """Each combination the book's §5.5 distinguishes (a review found three that read
    against each other): explained only by a hypothesis that reproduces the drop."""
    from defectfusion.analysis.postmortem import _outcome

    p2: dict[str, Any] = {"zero_start": {"verdict": {"branch": adopted, "vs_adopted": None}}}
    for v, (branch, vs) in controls.items():
        p2[v] = {"verdict": {"branch": branch, "vs_adopted": vs and {"verdict": vs}}}
    out = _outcome(p2, "zero_start")
    assert out["explained"] is explained and out["open"] is not explained
    assert out["removing_variants"] == removing
    assert out["adopted_reproduces"] is (adopted == "reproduces")
    assert out["any_partial"] is (adopted == "partial" or "partial" in [b for b, _ in controls.values()])
