"""`defectfusion pipeline verify` on constructed post-mortem results: a rerun within the
recorded run's uncertainty passes, one number beyond it or one changed verdict fails."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from defectfusion.analysis.verify import compare_postmortems, format_report, tolerance
from defectfusion.cli import main


def value(v: float, half: float) -> dict:
    return {"value": v, "ci": [v - half, v + half], "per_seed": [v]}


def recorded() -> dict:
    """A post-mortem file's shape, with two variants: one drops, one does not."""
    p2 = {}
    for name, e1, branch in (
        ("zero_start", 0.700, "equivalent"),
        ("clip_norm", 0.600, "reproduces"),
    ):
        p2[name] = {
            "values": {"epoch1": {"val": {"map": value(e1, 0.02)}}},
            "verdict": {"branch": branch},
        }
    return {
        "ci_level": 95,
        "phase1": {"test": {"map": value(0.70, 0.02)}, "val": {"map": value(0.70, 0.02)}},
        "phase2": p2,
        "contrasts": [
            {
                "a": "phase1",
                "b": "clip_norm",
                "which": "epoch1",
                "split": "val",
                "metric": "map",
                "diff": -0.100,
                "se": 0.005,
                "ci": [-0.11, -0.09],
            },
            {
                "a": "phase1",
                "b": "zero_start",
                "which": "epoch0",
                "split": "val",
                "metric": "map",
                "diff": 0.0,
                "se": 0.0,
                "ci": [0.0, 0.0],
            },
        ],  # fmt: skip
        "effects": {},
        "outcome": {"explained": True, "reproduces_variants": ["clip_norm"], "n_reproduces": 1},
    }


def test_the_same_results_reproduce() -> None:
    report = compare_postmortems(recorded(), recorded())
    assert report.reproduced and len(report.checks) == 6 and len(report.verdicts) == 4
    assert format_report(report)[-1].endswith("REPRODUCED")


def test_the_tolerance_is_the_recorded_uncertainty_family_wise() -> None:
    report = compare_postmortems(recorded(), recorded())
    drift = next(c for c in report.checks if c.name.startswith("clip_norm - phase1"))
    # 6 numbers at family-wise 95 %: z = Phi^-1(1 - 0.05 / 12)
    assert report.z == pytest.approx(2.638, abs=1e-3)
    assert drift.tol == pytest.approx(report.z * math.sqrt(2) * 0.005)
    assert drift.tol == pytest.approx(tolerance(0.005, 6))
    p1 = next(c for c in report.checks if c.name == "phase1 test map")
    assert p1.se == pytest.approx(0.02 / 1.959964, rel=1e-4)  # from the interval's half-width


def test_a_rerun_on_another_machine_within_the_spread_reproduces() -> None:
    """The two machines of the issue: Phase 1 test mAP 0.6955 vs 0.7057, the drift -0.0151
    vs -0.0183 (the same conclusion, other floats)."""
    rerun = recorded()
    rerun["phase1"]["test"]["map"]["value"] += 0.0102
    rerun["contrasts"][0]["diff"] += 0.0032
    report = compare_postmortems(recorded(), rerun)
    assert report.reproduced, format_report(report)


def test_a_number_beyond_its_tolerance_fails() -> None:
    rerun = recorded()
    rerun["contrasts"][0]["diff"] = -0.05  # half the recorded drop: 10 SE away
    report = compare_postmortems(recorded(), rerun)
    assert not report.reproduced
    assert [c.name for c in report.failed] == ["clip_norm - phase1 epoch1 val map"]
    assert "differs   clip_norm - phase1 epoch1 val map" in format_report(report)[0]


def test_a_zero_with_no_spread_holds_to_one_image_s_share() -> None:
    """A contrast recorded as exactly 0 with no spread (epoch 0 is Phase 1 itself) may move by
    one image's share of the split at most; without a split size, not at all."""
    rerun = recorded()
    rerun["contrasts"][1]["diff"] = 1e-6
    assert not compare_postmortems(recorded(), rerun).reproduced
    rec = {**recorded(), "n_images": {"val": 200, "test": 200}}
    rerun = {**rerun, "n_images": rec["n_images"]}
    assert compare_postmortems(rec, rerun).reproduced
    rerun["contrasts"][1]["diff"] = 0.05  # 10 images' worth
    assert not compare_postmortems(rec, rerun).reproduced


def test_a_changed_verdict_fails_even_with_every_number_close() -> None:
    rerun = recorded()
    rerun["phase2"]["clip_norm"]["verdict"]["branch"] = "partial"
    rerun["outcome"]["reproduces_variants"] = []
    report = compare_postmortems(recorded(), rerun)
    assert not report.failed and not report.reproduced
    assert {v[0] for v in report.changed_verdicts} == {
        "verdict clip_norm",
        "outcome reproduces_variants",
    }


def test_a_number_missing_from_the_rerun_fails() -> None:
    rerun = recorded()
    del rerun["phase2"]["clip_norm"]
    report = compare_postmortems(recorded(), rerun)
    assert "clip_norm epoch1 val map" in report.missing and not report.reproduced


def test_cli_exit_codes(tmp_path: Path, capsys) -> None:
    rec, same, off = tmp_path / "rec.json", tmp_path / "same", tmp_path / "off"
    rec.write_text(json.dumps(recorded()), encoding="utf-8")
    for folder, pm in ((same, recorded()), (off, copy.deepcopy(recorded()))):
        folder.mkdir()
        if folder == off:
            pm["phase1"]["val"]["map"]["value"] = 0.55
        (folder / "postmortem.json").write_text(json.dumps(pm), encoding="utf-8")
    args = ["pipeline", "verify", "--recorded", str(rec), "--results"]
    assert main([*args, str(same)]) == 0
    assert capsys.readouterr().out.strip().endswith("REPRODUCED")
    assert main([*args, str(off)]) == 1
    out = capsys.readouterr().out
    assert "phase1 val map" in out and "NOT REPRODUCED" in out
    (tmp_path / "bad.json").write_text("[]", encoding="utf-8")
    assert main(["pipeline", "verify", "--recorded", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a post-mortem results file" in err and "\n" not in err


def test_a_number_with_no_recorded_spread_gets_one_image_s_share() -> None:
    """A critical recall of 1.0 in every replicate has se 0: a rerun that misses one box must
    not fail for it."""
    rec = recorded()
    rec["n_images"] = {"val": 200, "test": 200}
    rec["phase1"]["val"]["critical_recall"] = {"value": 1.0, "ci": [1.0, 1.0]}
    rerun = copy.deepcopy(rec)
    rerun["phase1"]["val"]["critical_recall"]["value"] = 0.99
    report = compare_postmortems(rec, rerun)
    check = next(c for c in report.checks if c.name == "phase1 val critical_recall")
    assert check.se == pytest.approx(1 / 200) and check.ok and report.reproduced


@pytest.mark.parametrize(
    "damage",
    [
        lambda pm: pm.__setitem__("phase1", {"test": 7}),
        lambda pm: pm.__setitem__("ci_level", "95"),
        lambda pm: pm["contrasts"][0].__setitem__("se", -1.0),
    ],
    ids=["a split that is a number", "a level that is text", "a negative se"],
)
def test_a_malformed_recorded_file_is_one_line(damage) -> None:
    from defectfusion.core.errors import UserError

    rec = recorded()
    damage(rec)
    with pytest.raises(UserError) as e:
        compare_postmortems(rec, recorded())
    assert "\n" not in str(e.value)
