"""Tests of Phase 1 training (train/phase1.py, train/engine.py): outputs, determinism, resume,
and the equality of the two COCO evaluators on a trained model's real predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import defectfusion.train.engine as engine
from defectfusion.core.errors import UserError
from defectfusion.data import coco
from defectfusion.data.loader import make_loader
from defectfusion.evaluation import evaluate as ev
from defectfusion.evaluation import metrics
from defectfusion.model.checkpoint import load_checkpoint, load_detector
from defectfusion.train.phase1 import train_phase1

LOSS_TERMS = ("loss", "loss_mal", "loss_bbox", "loss_giou", "loss_fgl", "loss_ddf")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def history(run: Path) -> list[dict]:
    """history.jsonl without the wall-clock column."""
    return [
        {k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(run / "history.jsonl")
    ]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_epoch_run_writes_its_outputs(tiny_run: Path) -> None:
    for name in ("history.jsonl", "steps.jsonl", "experiment_log.txt", "last.pt", "best.pt"):
        assert (tiny_run / name).is_file(), name
    rows = read_jsonl(tiny_run / "history.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        for key in (
            *LOSS_TERMS,
            "val_map",
            "val_map50",
            "val_critical_recall",
            "val_composite",
            "lr",
            "seconds",
        ):
            assert isinstance(r[key], float), key
        assert all(np.isfinite(r[k]) for k in LOSS_TERMS)
        assert 0.0 <= r["val_map"] <= 1.0 and r["seconds"] > 0
    assert rows[0]["best"] is True  # the first evaluation always improves on nothing

    steps = read_jsonl(tiny_run / "steps.jsonl")  # 8 images, batch 4: 2 steps per epoch
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert [s["epoch"] for s in steps] == [1, 1, 2, 2]
    assert rows[-1]["step"] == 4

    log = (tiny_run / "experiment_log.txt").read_text()
    assert "phase1: deimv2-dinov3-tiny" in log and "epoch 2/2:" in log and "done:" in log
    # The config in its own file, not a log line; each epoch but the last says what is left.
    assert max(len(line) for line in log.splitlines()) < 400
    config = yaml.safe_load((tiny_run / "run_config.yaml").read_text())
    assert config["model"]["preset"] == "deimv2-dinov3-tiny" and config["phase1"]["epochs"] == 2
    lines = [ln.split("] ", 1)[-1] for ln in log.splitlines()]  # after the time stamp
    epochs = {ln.split(":")[0]: ln for ln in lines if ln.startswith("epoch ")}
    assert "left)" in epochs["epoch 1/2"] and "left)" not in epochs["epoch 2/2"]

    last, best = load_checkpoint(tiny_run / "last.pt"), load_checkpoint(tiny_run / "best.pt")
    assert last["epoch"] == 2 and last["step"] == 4 and last["finished"] is True
    for meta in (last["meta"], best["meta"]):
        assert meta["preset"] == "deimv2-dinov3-tiny" and meta["phase"] == 1
        assert meta["image_size"] == 96 and len(meta["class_names"]) == 6
    assert (
        best["meta"]["epoch"]
        == max((r for r in rows if r["best"]), key=lambda r: r["epoch"])["epoch"]
    )


def test_same_seed_gives_identical_history(tiny_cfg, tiny_run: Path, tmp_path: Path) -> None:
    train_phase1(tiny_cfg(), tmp_path)
    assert history(tmp_path) == history(tiny_run)
    assert read_jsonl(tmp_path / "steps.jsonl") == read_jsonl(tiny_run / "steps.jsonl")
    assert same_weights(tmp_path / "last.pt", tiny_run / "last.pt")


def test_another_seed_gives_another_run(tiny_cfg, tiny_run: Path, tmp_path: Path) -> None:
    # Keeps the determinism test honest: the history does depend on the seed.
    train_phase1(tiny_cfg(seed=1), tmp_path)
    assert history(tmp_path) != history(tiny_run)


class Interrupt(KeyboardInterrupt):
    pass


def interrupt_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Raise Ctrl-C right after optimizer step `step` (loss_terms runs once per step)."""
    real, calls = engine.loss_terms, []

    def loss_terms(loss_dict):
        calls.append(1)
        if len(calls) == step:
            raise Interrupt
        return real(loss_dict)

    monkeypatch.setattr(engine, "loss_terms", loss_terms)


@pytest.mark.parametrize("eval_every", [1, 2])
def test_resume_after_a_kill_mid_epoch_matches_an_uninterrupted_run(
    eval_every: int, tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_cfg(epochs=3, **{"phase1.eval_every": eval_every})
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    train_phase1(cfg, run_a)

    with monkeypatch.context() as m:
        interrupt_at_step(m, 3)  # 2 steps per epoch: killed after the first step of epoch 2
        with pytest.raises(Interrupt):
            train_phase1(cfg, run_b)
    assert load_checkpoint(run_b / "last.pt")["epoch"] == 1  # epoch 2 never reached its end
    train_phase1(cfg, run_b, resume=True)

    assert history(run_b) == history(run_a)
    assert read_jsonl(run_b / "steps.jsonl") == read_jsonl(run_a / "steps.jsonl")
    assert same_weights(run_b / "best.pt", run_a / "best.pt")
    assert same_weights(run_b / "last.pt", run_a / "last.pt")
    assert "resumed from" in (run_b / "experiment_log.txt").read_text()


def test_resume_of_a_finished_run_changes_nothing(tiny_cfg, tiny_run: Path) -> None:
    before = (tiny_run / "last.pt").read_bytes(), (tiny_run / "history.jsonl").read_text()
    train_phase1(tiny_cfg(), tiny_run, resume=True)
    assert ((tiny_run / "last.pt").read_bytes(), (tiny_run / "history.jsonl").read_text()) == before


def test_a_finished_run_whose_best_pt_was_removed_trains_again(
    tiny_cfg, tiny_run: Path, tmp_path: Path
) -> None:
    # Snakemake and DVC remove a rule's outputs (best.pt) before rerunning it, say after a
    # code change; --resume must then train again, not return without a best.pt.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "best.pt").unlink()
    train_phase1(tiny_cfg(), run, resume=True)
    assert same_weights(run / "best.pt", tiny_run / "best.pt")  # same seed, same model
    assert "finished, best.pt removed" in (run / "experiment_log.txt").read_text()
    assert (run / "history.jsonl").read_text() != ""


def test_resume_from_another_preset_is_refused(tiny_cfg, tiny_run: Path) -> None:
    with pytest.raises(UserError) as e:
        train_phase1(tiny_cfg(**{"model.preset": "deimv2-resnet-tiny"}), tiny_run, resume=True)
    msg = str(e.value)
    assert "\n" not in msg and str(tiny_run / "last.pt") in msg
    assert "'deimv2-dinov3-tiny'" in msg and "'deimv2-resnet-tiny'" in msg


def test_resume_with_other_classes_is_refused(tiny_cfg, tiny_run: Path, tmp_path: Path) -> None:
    data = four_class_copy(Path(tiny_cfg().data.dir), tmp_path)
    # critical classes within the four (else the config check refuses first, rightly)
    cfg = tiny_cfg(**{"data.dir": str(data), "data.critical_classes": "[2, 3]"})
    with pytest.raises(UserError) as e:
        train_phase1(cfg, tiny_run, resume=True)
    msg = str(e.value)
    assert "\n" not in msg and str(tiny_run / "last.pt") in msg
    assert "6 classes" in msg and "4 classes" in msg


def _damaged_last(tiny_run: Path, tmp_path: Path, damage) -> Path:
    import shutil

    from defectfusion.model.checkpoint import save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = load_checkpoint(run / "last.pt")
    ckpt["finished"] = False  # so the resume restores it instead of returning
    damage(ckpt)
    model, meta = ckpt.pop("model"), ckpt.pop("meta")
    ckpt.pop("format")
    save_checkpoint(run / "last.pt", model, meta, **ckpt)
    return run


def _reshape_one(ckpt: dict) -> None:
    key = "model.decoder.query_pos_head.layers.0.weight"
    w = ckpt["model"][key]
    ckpt["model"][key] = torch.zeros(w.shape[0] + 1, *w.shape[1:])


LAST_PT_DAMAGE = {
    "a tensor of another shape": (_reshape_one, "has shape"),
    "an optimiser state of another run": (
        lambda c: c["optimizer"]["param_groups"].pop(),
        "optimiser state",
    ),
    "a kept name that leaves the folder": (
        lambda c: c["kept"].__setitem__("../../escape.pt", c["kept"]["best.pt"]),
        "under the name",
    ),
    "an epoch that is not a count": (lambda c: c.__setitem__("epoch", "3"), "not counts"),
    "no best": (lambda c: c.pop("best"), "best"),
    "a NaN best": (lambda c: c.__setitem__("best", float("nan")), "best"),
}


@pytest.mark.parametrize("case", sorted(LAST_PT_DAMAGE))
def test_resume_from_a_last_pt_that_does_not_fit_is_one_line(
    case: str, tiny_cfg, tiny_run: Path, tmp_path: Path
) -> None:
    """--resume with a last.pt whose one tensor had another shape ended in a size-mismatch
    traceback (issue 27); its neighbours too. Nothing in the run folder is written."""
    damage, word = LAST_PT_DAMAGE[case]
    run = _damaged_last(tiny_run, tmp_path, damage)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    (run / "best.pt").unlink()  # a kept file the restore would otherwise write back
    del before["best.pt"]
    with pytest.raises(UserError, match=word) as e:
        train_phase1(tiny_cfg(), run, resume=True)
    msg = str(e.value)
    assert "\n" not in msg and "cannot resume" in msg and "--restart" in msg
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert not (tmp_path / "escape.pt").exists()


def four_class_copy(src: Path, dst: Path) -> Path:
    """The tiny dataset with its categories cut to four (annotations of the rest dropped)."""
    import shutil

    shutil.copytree(src / "images", dst / "images")
    for split in coco.SPLITS:
        data = coco.load_json(coco.split_path(src, split))
        data["categories"] = data["categories"][:4]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] < 4]
        coco.write_split(dst, split, data)
    return dst


def test_missing_dataset_is_a_one_line_error(tiny_cfg, tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        train_phase1(tiny_cfg(**{"data.dir": str(tmp_path / "none")}), tmp_path / "run")
    assert "\n" not in str(e.value) and "defectfusion data synth" in str(e.value)


def test_faster_coco_eval_equals_pycocotools_on_real_predictions(
    tiny_cfg, tiny_data: Path, tmp_path: Path
) -> None:
    # ~12 s: enough steps for the detector's ranking to find some objects (non-zero AP/AR).
    cfg = tiny_cfg(epochs=20, **{"phase1.lr": 0.003, "phase1.eval_every": 20})
    train_phase1(cfg, tmp_path)
    model, meta = load_detector(tmp_path / "last.pt")
    # The training split: 40 steps on 8 images find some of those objects (the test split
    # can stay at AP 0, the trivial case this test must not settle for).
    test_json = coco.split_path(tiny_data, "train")
    gt = coco.load_json(test_json)
    results = ev.predict(
        model, make_loader(test_json, meta["image_size"], 4, train=False), progress=False
    )
    assert len(results) == model.config.num_queries * len(gt["images"])  # top-Q pairs per image
    m = metrics.coco_metrics(gt, results, meta["critical_classes"], meta["composite_weights"])
    reference = metrics.pycocotools_metrics(gt, results)
    assert max(m["stats_100"]) > 0  # not the trivial all-zero case
    np.testing.assert_allclose(m["stats_100"], reference, rtol=0, atol=1e-12)


def test_interrupted_run_whose_outputs_were_removed_gets_its_best_back(
    tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C, then `snakemake --rerun-incomplete` removes best.pt and best_raw.pt before the
    rerun: the resumed run must restore them (no later epoch may beat the stored best, and
    best.pt used to be never written again: MissingOutputException, then a retrain)."""
    cfg = tiny_cfg(epochs=3)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    train_phase1(cfg, run_a)
    with monkeypatch.context() as m:
        interrupt_at_step(m, 5)  # killed in epoch 3; epochs 1 and 2 are in last.pt
        with pytest.raises(Interrupt):
            train_phase1(cfg, run_b)
    (run_b / "best.pt").unlink()
    (run_b / "best_raw.pt").unlink()
    train_phase1(cfg, run_b, resume=True)
    assert same_weights(run_b / "best.pt", run_a / "best.pt")
    assert same_weights(run_b / "best_raw.pt", run_a / "best_raw.pt")
    assert history(run_b) == history(run_a)


def test_a_new_run_never_replaces_an_earlier_best_unless_told(
    tiny_cfg, tiny_run: Path, tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / "best.pt").read_bytes()
    with pytest.raises(UserError, match="--restart"):  # no --resume: a new run
        train_phase1(tiny_cfg(), run)
    with pytest.raises(UserError, match="another config"):  # --resume, config changed
        train_phase1(tiny_cfg(**{"phase1.lr": 0.002}), run, resume=True)
    assert (run / "best.pt").read_bytes() == before
    train_phase1(tiny_cfg(**{"phase1.lr": 0.002}), run, resume=True, restart=True)
    assert (run / "best.pt").read_bytes() != before
    assert "not resuming" in (run / "experiment_log.txt").read_text()


def test_epoch_lines_reach_stdout(tiny_cfg, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A Snakemake log (stdout) reads one line per epoch and a closing line."""
    train_phase1(tiny_cfg(), tmp_path / "run")
    out = capsys.readouterr().out
    assert [ln.split(":")[0] for ln in out.splitlines() if ln.startswith("epoch ")] == [
        "epoch 1/2",
        "epoch 2/2",
    ]
    assert "\r" not in out and "done: best val map" in out


def test_a_val_split_that_cannot_score_the_selection_is_one_line(tmp_path) -> None:
    """No boxes in val (which `data validate` accepts), or none of a critical class when
    selecting on critical recall, used to end in a TypeError after an epoch (issue 27)."""
    import json

    import pytest

    from defectfusion.core.errors import UserError
    from defectfusion.train.engine import check_selectable

    path = tmp_path / "val.json"
    base = {"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
            "categories": [{"id": i, "name": str(i)} for i in range(6)]}  # fmt: skip
    path.write_text(json.dumps({**base, "annotations": []}))
    with pytest.raises(UserError, match="no boxes in the val split"):
        check_selectable(path, "map", [2, 3, 5])
    box = {"id": 1, "image_id": 1, "category_id": 0, "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0}
    path.write_text(json.dumps({**base, "annotations": [box]}))
    check_selectable(path, "map", [2, 3, 5])
    with pytest.raises(UserError, match="no box of a critical class"):
        check_selectable(path, "critical_recall", [2, 3, 5])
    check_selectable(path, "composite", [0])


def test_phase1_holds_the_minimum_lr_until_its_plateau(
    tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """phase1.max_epochs: past the schedule's `epochs`, the minimum lr is held until the
    plateau criterion is met (then the run stops, finished), at most `max_epochs`."""
    # a criterion every run meets: the run stops where its schedule ends
    met = tiny_cfg(2, **{"phase1.max_epochs": 5, "phase1.plateau_min_gain": 1.0})
    train_phase1(met, tmp_path / "met")
    rows = [json.loads(x) for x in (tmp_path / "met" / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "plateau met at epoch 2" in (tmp_path / "met" / "experiment_log.txt").read_text()
    # never met: the minimum lr is held for the extra epochs, up to max_epochs
    monkeypatch.setattr(engine, "plateau_stop", lambda history, tc: False)
    never = tiny_cfg(2, **{"phase1.max_epochs": 4})
    train_phase1(never, tmp_path / "never")
    rows = [json.loads(x) for x in (tmp_path / "never" / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    lr_min = never.phase1.lr * never.phase1.min_lr_fraction
    assert rows[2]["lr"] == pytest.approx(lr_min) and rows[3]["lr"] == pytest.approx(lr_min)
    assert torch.load(tmp_path / "never" / "last.pt", weights_only=False)["finished"] is True
