"""Phase 2 training as the post-mortem needs it: epoch 0 logged but never selected, fixed-epoch
weights and val predictions kept, the variants' switches (raw start, CLIP normalisation), and
the DEIMv2 recipe pieces Phase 1 uses (EMA ramp, plateau)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from defectfusion.config import load_config
from defectfusion.model.checkpoint import load_checkpoint
from defectfusion.train.schedule import ema_decay_at, plateau_gain


def phase2_cfg(tiny_data: Path, **extra: object):
    values = {
        "phase2.epochs": 2,
        "phase2.batch_size": 4,
        "phase2.patience": 0,
        "phase2.lr": 0.01,  # large enough that two epochs move the heads
        "text.encoder": "random",
        **extra,
    }
    return load_config(
        overrides=tiny_overrides(tiny_data, 2) + [f"{k}={v}" for k, v in values.items()]
    )


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def phase2_run(tiny_data: Path, tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from defectfusion.train.phase2 import train_phase2

    out = tmp_path_factory.mktemp("phase2")
    train_phase2(phase2_cfg(tiny_data), tiny_run / "best.pt", out)
    return out


def test_epoch0_is_logged_but_never_selected(phase2_run: Path) -> None:
    hist = rows(phase2_run / "history.jsonl")
    assert [r["epoch"] for r in hist] == [0, 1, 2]
    assert "best" not in hist[0]  # epoch 0 does not take part in the selection
    assert hist[1]["best"] is True  # the first trained epoch is the first candidate
    best = load_checkpoint(phase2_run / "best.pt")
    assert best["meta"]["epoch"] >= 1
    log = (phase2_run / "experiment_log.txt").read_text()
    assert "not selectable" in log


def test_epoch0_cannot_win_even_when_it_scores_best(
    tiny_data: Path, tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thesis's case: every trained epoch scores below epoch 0 (a falling run). Epoch 0
    used to win the selection, so the run was reported as identical to Phase 1."""
    import defectfusion.train.phase2 as phase2

    scores = iter([0.9, 0.5, 0.6])  # epochs 0, 1, 2: a drop at epoch 1

    def scripted(cfg, val_json, loader=None):
        def evaluate(model):
            v = next(scores)
            return {"map": v, "map50": v, "critical_recall": v, "composite": v, "predictions": []}

        return evaluate

    monkeypatch.setattr(phase2, "make_evaluator", scripted)
    cfg = phase2_cfg(tiny_data, **{"phase2.select_metric": "composite"})
    phase2.train_phase2(cfg, tiny_run / "best.pt", tmp_path)
    hist = rows(tmp_path / "history.jsonl")
    assert [r["val_composite"] for r in hist] == [0.9, 0.5, 0.6]
    assert load_checkpoint(tmp_path / "best.pt")["meta"]["epoch"] == 2


def test_fixed_epoch_weights_and_val_predictions_are_kept(phase2_run: Path) -> None:
    e1, final = load_checkpoint(phase2_run / "epoch1.pt"), load_checkpoint(phase2_run / "final.pt")
    assert e1["meta"]["epoch"] == 1 and final["meta"]["epoch"] == 2
    assert not torch.equal(e1["model"]["fusion.alpha"], final["model"]["fusion.alpha"])
    for name in ("val_epoch0", "val_epoch1", "val_final"):
        preds = json.loads((phase2_run / f"{name}.predictions.json").read_text())
        assert preds and {"image_id", "category_id", "bbox", "score"} <= set(preds[0])
    e0 = json.loads((phase2_run / "val_epoch0.predictions.json").read_text())
    e1p = json.loads((phase2_run / "val_epoch1.predictions.json").read_text())
    assert e0 != e1p  # one epoch of training moved the detections


def test_phase1_writes_its_raw_weights_beside_best(tiny_run: Path) -> None:
    raw = load_checkpoint(tiny_run / "best_raw.pt")
    best = load_checkpoint(tiny_run / "best.pt")
    assert raw["meta"]["weights"] == "raw" and raw["meta"]["epoch"] == best["meta"]["epoch"]
    # No EMA in the tiny run: the raw weights are the reported ones.
    assert all(torch.equal(raw["model"][k], best["model"][k]) for k in best["model"])


def test_raw_start_and_clip_normalisation_reach_the_run(
    tiny_data: Path, tiny_run: Path, phase2_run: Path, tmp_path: Path
) -> None:
    from defectfusion.train.phase2 import train_phase2

    cfg = phase2_cfg(
        tiny_data, **{"fusion.start": "raw", "data.normalize": "clip", "phase2.epochs": 1}
    )
    train_phase2(cfg, tiny_run / "best.pt", tmp_path)
    meta = load_checkpoint(tmp_path / "best.pt")["meta"]
    assert meta["phase1_checkpoint"].endswith("best_raw.pt")
    assert meta["normalize"] == "clip" and meta["variant"]["start"] == "raw"
    # Another normalisation moves epoch 0's detections (same start, ImageNet constants there).
    clip0 = json.loads((tmp_path / "val_epoch0.predictions.json").read_text())
    imagenet0 = json.loads((phase2_run / "val_epoch0.predictions.json").read_text())
    assert [r["score"] for r in clip0] != [r["score"] for r in imagenet0]


@pytest.mark.parametrize(
    "switch", [{"data.normalize": "none"}, {"data.image_size": 128}], ids=["no_norm", "size128"]
)
def test_a_variant_s_own_normalisation_or_input_size_trains_and_evaluates_at_it(
    tiny_data: Path, tiny_run: Path, phase2_run: Path, tmp_path: Path, switch: dict
) -> None:
    """no_norm and res_256 in small: Phase 2 from the tiny Phase 1 (ImageNet constants, 96 px)
    trains at the variant's setting, caches its features at it, evaluates epoch 0 at it, and
    records it in its checkpoints, so `evaluate` (live, without a config) preprocesses as the
    training's validation did: the same detections, bit for bit."""
    from conftest import TINY_SIZE
    from defectfusion.data.coco import split_path
    from defectfusion.evaluation.evaluate import evaluate_checkpoint, predictions_path
    from defectfusion.train.phase2 import train_phase2

    cache = tmp_path / "cache"
    cfg = phase2_cfg(tiny_data, **{**switch, "phase2.epochs": 1, "phase2.cache_dir": str(cache)})
    run = tmp_path / "run"
    train_phase2(cfg, tiny_run / "best.pt", run)
    assert [r["epoch"] for r in rows(run / "history.jsonl")] == [0, 1]
    meta = load_checkpoint(run / "best.pt")["meta"]
    assert (meta["image_size"], meta["normalize"]) == (cfg.data.image_size, cfg.data.normalize)
    assert (meta["phase1_image_size"], meta["phase1_normalize"]) == (TINY_SIZE, "imagenet")
    assert meta["variant"]["image_size"] == cfg.data.image_size
    assert list(cache.rglob("*.safetensors"))  # the cache was built at the variant's input
    # Epoch 0 (Phase 1's weights, untouched) ran at the variant's input: other detections
    # than the default variant's epoch 0 on the same images.
    e0 = json.loads((run / "val_epoch0.predictions.json").read_text())
    default0 = json.loads((phase2_run / "val_epoch0.predictions.json").read_text())
    assert e0 and [r["score"] for r in e0] != [r["score"] for r in default0]
    # The checkpoint alone tells evaluation the size and normalisation: best.pt is epoch 1.
    val = split_path(tiny_data, "val")
    evaluate_checkpoint(run / "best.pt", val, tmp_path / "m.json")
    live = json.loads(predictions_path(tmp_path / "m.json").read_text())
    assert live == json.loads((run / "val_epoch1.predictions.json").read_text())


def test_a_model_that_fixes_its_input_size_is_not_resized() -> None:
    """Nothing in the presets is tied to the training size; a DEIMv2 config that fixes it
    (eval_size, anchor_image_size: size-bound buffers) is refused at another size, one line."""
    from defectfusion.core.errors import UserError
    from defectfusion.model.models import build_model
    from defectfusion.train.phase2 import check_resizable

    model = build_model("deimv2-dinov3-tiny", ["a", "b"])
    check_resizable(model, 96, 128, "p1.pt")  # the presets: any size
    model.config.anchor_image_size = [96, 96]
    check_resizable(model, 96, 96, "p1.pt")  # its own size still runs
    with pytest.raises(UserError) as e:
        check_resizable(model, 96, 128, "p1.pt")
    assert "\n" not in str(e.value) and "anchor_image_size" in str(e.value)


def test_raw_start_without_raw_weights_is_one_line(
    tiny_data: Path, tiny_run: Path, tmp_path: Path
) -> None:
    import shutil

    from defectfusion.core.errors import UserError
    from defectfusion.train.phase2 import train_phase2

    shutil.copy(tiny_run / "best.pt", tmp_path / "best.pt")
    with pytest.raises(UserError, match="best_raw.pt"):
        train_phase2(
            phase2_cfg(tiny_data, **{"fusion.start": "raw"}), tmp_path / "best.pt", tmp_path / "out"
        )


# ---- the DEIMv2 recipe: EMA ramp, plateau ---------------------------------------------


def test_ema_follows_the_ramp_formula() -> None:
    from defectfusion.train.engine import make_ema

    decay, warm = 0.9999, 3
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = make_ema(model, decay, warm)
    expected = 0.0
    for t in range(1, 8):
        with torch.no_grad():
            model.weight.fill_(float(t))
        ema.update_parameters(model)
        # torch's AveragedModel copies on its first update (DEIMv2's d_1 = d(1-e^-1/w) ~ 0 there
        # too when w is large); from then on, update t blends with d_t = d(1 - exp(-t/w)).
        d = 0.0 if t == 1 else decay * (1 - math.exp(-t / warm))
        expected = d * expected + (1 - d) * t
        assert ema.module.weight[0, 0].item() == pytest.approx(expected, rel=1e-6), t
    assert ema_decay_at(2000, 0.9999, 2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))
    assert ema_decay_at(10, 0.9, 0) == 0.9


def test_plateau_gain_over_the_last_fraction() -> None:
    h = [{"epoch": e, "val_map": e / 10} for e in range(0, 11)]
    p = plateau_gain(h, 0.2)
    assert (p["from_epoch"], p["to_epoch"]) == (8, 10) and p["gain"] == pytest.approx(0.2)
    flat = [{"epoch": e, "val_map": 0.5 + (0.001 if e > 8 else 0)} for e in range(1, 11)]
    assert plateau_gain(flat, 0.2)["gain"] == pytest.approx(0.001)
    assert plateau_gain(h[:2], 0.2)["gain"] is None


def test_lr_schedule_warms_up_stays_flat_decays_then_holds_the_minimum() -> None:
    """DEIM's flat-cosine with its final stretch at the minimum lr (phase1.final_fraction)."""
    from types import SimpleNamespace

    from defectfusion.train.schedule import lr_lambda

    tc = SimpleNamespace(warmup_steps=10, flat_fraction=0.5, min_lr_fraction=0.05, final_fraction=0.2)
    f = lr_lambda(100, tc)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # warm-up
    assert f(10) == f(49) == 1.0  # flat
    assert f(65) == pytest.approx(0.05 + 0.95 * 0.5)  # half-way down the cosine (50 -> 80)
    assert f(80) == pytest.approx(0.05) and f(99) == pytest.approx(0.05)  # the final 20 %
    assert all(f(i) >= f(i + 1) for i in range(10, 99))  # never rises after warm-up
    no_final = lr_lambda(100, SimpleNamespace(**{**vars(tc), "final_fraction": 0.0}))
    assert no_final(99) > 0.05 and no_final(75) == pytest.approx(0.05 + 0.95 * 0.5)


def test_quadratic_warmup_is_deims_and_a_bad_shape_is_one_line() -> None:
    """DEIM's FlatCosineLRScheduler warms up as (t / W)^2 (the GPU profiles' warmup_shape)."""
    from types import SimpleNamespace

    from defectfusion.core.errors import UserError
    from defectfusion.train.schedule import lr_lambda

    tc = SimpleNamespace(warmup_steps=10, flat_fraction=0.5, min_lr_fraction=0.5,
                         final_fraction=0.1, warmup_shape="quadratic")  # fmt: skip
    f = lr_lambda(100, tc)
    assert f(0) == pytest.approx(0.01) and f(4) == pytest.approx(0.25) and f(9) == 1.0
    assert f(99) == pytest.approx(0.5)  # lr_gamma 0.5: DEIMv2's minimum
    with pytest.raises(UserError, match="warmup_shape"):
        load_config(None, ["phase1.warmup_shape=cubic"])


def test_flat_and_final_stretches_cannot_overlap() -> None:
    from defectfusion.core.errors import UserError

    with pytest.raises(UserError, match="final_fraction"):
        load_config(None, ["phase1.flat_fraction=0.9", "phase1.final_fraction=0.2"])


def test_phase2_reads_the_text_stage_embeddings_and_refuses_others(
    tiny_data: Path, tmp_path: Path
) -> None:
    from defectfusion.core.errors import UserError
    from defectfusion.core.jsonio import load_json
    from defectfusion.data.coco import category_names, split_path
    from defectfusion.model.text import embed_prompts, save_embeddings
    from defectfusion.train.phase2 import text_embeddings

    cfg = phase2_cfg(tiny_data)
    names = category_names(load_json(split_path(tiny_data, "train")))
    path = save_embeddings(
        tmp_path / "t.pt", embed_prompts(cfg.text.prompts, "random", None, names)
    )
    got = text_embeddings(cfg, names, path)
    assert torch.equal(got["embeddings"], text_embeddings(cfg, names)["embeddings"])
    other = phase2_cfg(tiny_data, **{"text.encoder": "minilm"})
    with pytest.raises(UserError, match="encoder"):
        text_embeddings(other, names, path)
    with pytest.raises(UserError, match="classes"):
        text_embeddings(cfg, [*names[:-1], "other"], path)


def test_cached_test_evaluation_equals_the_live_one(
    tiny_data: Path, phase2_run: Path, tmp_path: Path
) -> None:
    """`evaluate` reads a Phase 2 checkpoint's frozen part from the cache: same detections."""
    from defectfusion.data.coco import split_path
    from defectfusion.evaluation.evaluate import evaluate_checkpoint, predictions_path

    test = split_path(tiny_data, "test")
    out = {}
    for cache in (True, False):
        cfg = phase2_cfg(
            tiny_data, **{"phase2.cache": cache, "phase2.cache_dir": str(tmp_path / "cache")}
        )
        m = evaluate_checkpoint(phase2_run / "final.pt", test, tmp_path / f"{cache}.json", cfg)
        out[cache] = (m["map"], predictions_path(tmp_path / f"{cache}.json").read_text())
    assert list((tmp_path / "cache").rglob("*.safetensors"))  # the cached path did run
    assert out[True] == out[False]
