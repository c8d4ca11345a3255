"""The figures drawn from a small hand-made results tree (no pipeline run): what a committee
reader checks on the page, asked of the drawn matplotlib objects (which boxes a panel holds,
which seed a case came from, whether a curve or a label is hidden by another)."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
from PIL import Image

from common import NAMES
from defectfusion.config import load_config
from defectfusion.layout import Layout
from defectfusion.report.figures import (
    MIN_PRINT_PT,
    STYLE,
    Ctx,
    _renderer,
    draw_function,
    fit_to_column,
    smallest_text_pt,
    variant_color,
    variant_dash,
    variant_marker,
)

ROOT = Path(__file__).resolve().parents[1]
MAIN = "deimv2-dinov3-tiny"
NINE = (
    "zero_start", "naive", "frozen0", "deimv2_loss", "bn_train",
    "raw_start", "clip_norm", "decoder_only", "thesis_replica",
)  # fmt: skip
BOX = [10.0, 10.0, 20.0, 20.0]


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    else:
        path.write_text(json.dumps(data), encoding="utf-8")


def _ann(i: int, image: int, cat: int, bbox: list[float] = BOX) -> dict:
    return {"id": i, "image_id": image, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3],
            "iscrowd": 0}  # fmt: skip


def _det(image: int, cat: int, score: float, bbox: list[float] = BOX) -> dict:
    return {"image_id": image, "category_id": cat, "bbox": bbox, "score": score}


def fake_run(
    root: Path,
    variants: tuple[str, ...] = ("zero_start", "naive"),
    seeds: tuple[int, ...] = (0, 1),
    phase2_preds: dict[int, list[dict]] | None = None,
) -> Ctx:
    """A results tree in `root` (the working directory of the figures' relative paths): a
    test split of four images with one critical box each (class 2), Phase 1's histories and
    predictions (it finds the boxes of images 1 and 2), each variant's and seed's histories,
    steps and predictions (`phase2_preds`: seed -> predictions; default: those of Phase 1)."""
    data = root / "data/d"
    (data / "images").mkdir(parents=True)
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in (1, 2, 3, 4)]
    for im in images:
        Image.new("RGB", (64, 64), (90, 90, 90)).save(data / "images" / im["file_name"])
    categories = [{"id": k, "name": n} for k, n in enumerate(NAMES)]
    gt = {"images": images, "categories": categories,
          "annotations": [_ann(i, i, 2) for i in (1, 2, 3, 4)]}  # fmt: skip
    for split in ("train", "val", "test"):
        _write(data / f"annotations/{split}.json", gt)
    values = load_config([ROOT / "params.yaml"]).to_dict()
    values["data"]["dir"] = "data/d"
    layout = Layout("data/d", (MAIN,), MAIN, variants, seeds)
    phase1_preds = [_det(1, 2, 0.9), _det(2, 2, 0.6)]
    _write(root / layout.phase1(MAIN, "test_metrics.predictions.json"), phase1_preds)
    _write(
        root / layout.phase1(MAIN, "history.jsonl"),
        [{"epoch": e, "loss": 10 - e, "val_map": 0.79, "val_critical_recall": 0.82,
          "best": e == 2} for e in (1, 2)],
    )  # fmt: skip
    for i, v in enumerate(variants):
        for s in seeds:
            # every variant but the second on the same curves: the bundles of the real run
            a0, w0 = (0.1, 10.0) if i == 1 else (0.0, 1.5)
            rate = 1e-3 * (1 if s % 2 == 0 else -1) * (0.5 if i == 1 else 1.0)
            _write(
                root / layout.phase2(v, s, "history.jsonl"),
                [{"epoch": e, "alpha": a0 + rate * 10 * e, "w_proj_norm": w0,
                  "loss": None if e == 0 else 5.0 - 0.01 * e, "val_map": 0.79 - 0.001 * e,
                  "val_critical_recall": 0.82, "best": e == 1} for e in (0, 1, 2)],
            )  # fmt: skip
            _write(
                root / layout.phase2(v, s, "steps.jsonl"),
                [{"step": t, "epoch": 1 + t // 10, "alpha": a0 + rate * t, "tau": 0.07 - 1e-5 * t,
                  "w_proj_norm": w0 - 1e-3 * t} for t in range(1, 21)],
            )  # fmt: skip
            preds = (phase2_preds or {}).get(s, phase1_preds)
            _write(root / layout.phase2(v, s, "test_metrics.predictions.json"), preds)
    return Ctx(values, layout)


def draw(name: str, ctx: Ctx) -> tuple[Any, float | None]:
    """What `write_figures` does before saving: the style, the column's width, the measure."""
    with matplotlib.rc_context(STYLE):
        fig = draw_function(name)(ctx)
        fit_to_column(fig)
        return fig, smallest_text_pt(fig)


def texts(fig: Any) -> str:
    from matplotlib.text import Text

    return "\n".join(t.get_text() for t in fig.findobj(Text) if t.get_visible())


# ---- Figure dataset_examples ----------------------------------------------------------------


def test_each_class_row_ends_with_an_image_that_shows_other_classes_boxes() -> None:
    """The caption promises other classes' boxes, dashed: a row of the cleanest images alone
    showed none. The last panel is the cleanest image that has some (when the class has one)."""
    from defectfusion.report.figures.dataset_examples import examples

    per_image = {i: [{"category_id": 0}] for i in (1, 2, 3, 4)}  # class 0 alone
    per_image[5] = [{"category_id": 0}, {"category_id": 1}]  # one box of another class
    per_image[6] = [{"category_id": 0}, {"category_id": 1}, {"category_id": 2}]
    per_image[7] = [{"category_id": 1}]  # class 1 alone
    assert examples(per_image, 0, 4) == [1, 2, 3, 5]
    assert examples(per_image, 0, 2) == [1, 5]
    assert examples(per_image, 1, 4) == [7, 5, 6]  # every image of the class, cleanest first
    assert examples(per_image, 2, 4) == [6]
    assert examples({1: [{"category_id": 0}], 2: [{"category_id": 0}]}, 0, 4) == [1, 2]


def test_dataset_examples_draw_the_other_classes_boxes_dashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five training images of fractures, one with a dent beside it: the row shows the dent,
    dashed, though four images of fractures alone were cleaner."""
    monkeypatch.chdir(tmp_path)
    ctx = fake_run(tmp_path)
    gt = json.loads(Path(ctx.layout.split("train")).read_text())
    gt["images"].append({**gt["images"][0], "id": 5, "file_name": "5.png"})
    Image.new("RGB", (64, 64)).save(Path(ctx.layout.data_dir) / "images/5.png")
    gt["annotations"] += [_ann(5, 5, 2), _ann(9, 1, 4, [40.0, 40.0, 10.0, 10.0])]
    _write(Path(ctx.layout.split("train")), gt)
    fig, pt = draw("dataset_examples", ctx)
    assert pt is not None and pt >= MIN_PRINT_PT
    row = NAMES.index("fracture")
    panels = fig.axes[4 * row : 4 * row + 4]
    assert [ax.get_title() for ax in panels] == [f"imagen {i}" for i in (2, 3, 4, 1)]
    boxes = [p for ax in panels for p in ax.patches]
    dashed = [p for p in boxes if p.get_linestyle() not in ("-", "solid")]
    assert len(boxes) == 5 and len(dashed) == 1  # four fractures, the dent dashed


# ---- Figure qualitative -------------------------------------------------------------------


def test_qualitative_cases_are_pooled_over_the_seeds() -> None:
    from defectfusion.evaluation.metrics import pooled_cases

    gt = {"images": [{"id": i} for i in (1, 2)], "annotations": [_ann(i, i, 2) for i in (1, 2)]}
    phase1 = [_det(2, 2, 0.9)]  # Phase 1 finds image 2's box
    by_seed = {
        0: [_det(2, 2, 0.5)],  # seed 0 finds what Phase 1 finds: no case
        1: [_det(1, 2, 0.6), _det(2, 2, 0.1)],  # finds image 1's, misses image 2's
        2: [_det(1, 2, 0.8)],  # image 1 again, by a larger gap; misses image 2's (gap 0.9)
    }
    cases = pooled_cases(gt, phase1, by_seed, [2], 0.3)
    assert [(c["image_id"], c["seed"]) for c in cases["b_not_a"]] == [(1, 2)]  # the larger gap
    assert cases["b_not_a"][0]["gap"] == pytest.approx(0.8)
    assert [(c["image_id"], c["seed"]) for c in cases["a_not_b"]] == [(2, 2)]  # ties: first seed
    assert pooled_cases(gt, phase1, {0: by_seed[0]}, [2], 0.3) == {"b_not_a": [], "a_not_b": []}


def test_qualitative_shows_a_case_of_any_seed_and_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seed 0 agrees with Phase 1 everywhere; seed 1 finds image 3's box, which Phase 1
    misses: the figure shows it, says it is seed 1's, and says what it searched for in the
    direction without a case."""
    monkeypatch.chdir(tmp_path)
    same = [_det(1, 2, 0.9), _det(2, 2, 0.6)]
    ctx = fake_run(tmp_path, seeds=(0, 1), phase2_preds={0: same, 1: [*same, _det(3, 2, 0.7)]})
    fig, pt = draw("qualitative", ctx)
    text = texts(fig)
    assert "imagen 3" in text and "(Fase 2: semilla 1)" in text
    assert "ninguna de las 2 semillas" in text and "IoU ≥ 0.5" in text and "0.30" in text
    assert pt is not None and pt >= MIN_PRINT_PT


def test_qualitative_without_any_case_says_so_and_draws_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    fig, pt = draw("qualitative", fake_run(tmp_path, seeds=(0,)))
    text = texts(fig)
    assert text.count("ninguna imagen de prueba, con la única semilla") == 2
    from matplotlib.axes import Axes

    assert not fig.findobj(Axes) and not fig.legends and "caja real" not in text
    assert pt is not None and pt >= MIN_PRINT_PT


# ---- Figures gate_dynamics and postmortem -------------------------------------------------------


def test_nine_variants_differ_in_shape_not_only_in_colour() -> None:
    """Colours alone mixed vermillion, orange and olive: each variant has a marker of its own."""
    layout = Layout("data/d", (MAIN,), MAIN, NINE, (0,))
    styles = [
        (variant_color(layout, v), str(variant_dash(layout, v)), variant_marker(layout, v))
        for v in NINE
    ]
    assert len({m for _, _, m in styles}) == len(NINE)
    assert len(set(styles)) == len(NINE)


def test_gate_dynamics_marks_each_variant_and_prints_its_legend_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Coinciding curves (two variants here) each show their markers, at steps of their own;
    the legend prints at 8 pt or more at the column's width."""
    monkeypatch.chdir(tmp_path)
    ctx = fake_run(tmp_path, variants=("zero_start", "naive", "frozen0"))
    fig, pt = draw("gate_dynamics", ctx)
    assert pt is not None and pt >= MIN_PRINT_PT
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() not in (None, "None", "")]
    assert len(lines) == 3 * 2  # every variant and seed
    marks = {}
    for ln in lines:
        every = ln.get_markevery()
        marks.setdefault(ln.get_marker(), set()).add(every[0] if isinstance(every, tuple) else 0)
    assert len(marks) == 3 and len({min(v) for v in marks.values()}) == 3  # staggered
    (legend,) = fig.legends
    width = fig.get_tightbbox(_renderer(fig)).width
    printed = min(t.get_fontsize() for t in legend.get_texts()) * min(1.0, 6.69 / width)
    assert printed >= MIN_PRINT_PT
    assert "α₀ 0, ‖W‖₀ 1.5, salvo donde se indica" in legend.get_title().get_text()
    assert any("ingenua (α₀ 0.1, ‖W‖₀ 10)" in t.get_text() for t in legend.get_texts())


def _panel_texts(fig: Any, ax: Any) -> list[Any]:
    """The extents of a panel's axis labels and of the tick labels it shows (matplotlib also
    lists ticks beyond the axis's limits, which it does not draw)."""
    renderer = _renderer(fig)
    out = [ax.yaxis.label, ax.xaxis.label]
    for labels, (lo, hi), k in (
        (ax.get_xticklabels(), sorted(ax.get_xlim()), 0),
        (ax.get_yticklabels(), sorted(ax.get_ylim()), 1),
    ):
        out += [t for t in labels if lo <= t.get_position()[k] <= hi]
    return [t.get_window_extent(renderer) for t in out if t.get_visible() and t.get_text()]


def _no_text_touches_another_panel(fig: Any) -> None:
    fig.draw_without_rendering()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    for a, b in combinations(axes, 2):
        for ta in _panel_texts(fig, a):
            for tb in _panel_texts(fig, b):
                assert not ta.overlaps(tb), (ta, tb)


def test_postmortem_draws_phase1_over_the_curves_and_keeps_the_panels_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    fig, pt = draw("postmortem", fake_run(tmp_path, variants=NINE))
    assert pt is not None and pt >= MIN_PRINT_PT
    for ax in fig.axes[1:]:  # (b) and (c) have Phase 1's level
        lines = ax.get_lines()
        reference = [ln for ln in lines if ln.get_label().startswith("Fase 1")]
        curves = [ln for ln in lines if ln not in reference]
        assert len(reference) == 1 and len(curves) == len(NINE)
        assert reference[0].get_zorder() > max(c.get_zorder() for c in curves)
        assert len({c.get_marker() for c in curves}) == len(NINE)
        # the points of one epoch side by side, not on top of each other
        assert len({float(c.get_xdata()[0]) for c in curves}) == len(NINE)
    _no_text_touches_another_panel(fig)


# ---- Figure pr_curves ---------------------------------------------------------------------------


def test_pr_curves_tick_labels_of_neighbouring_panels_do_not_touch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    fig, pt = draw("pr_curves", fake_run(tmp_path))
    assert pt is not None and pt >= MIN_PRINT_PT
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "0.5", "1"]
    _no_text_touches_another_panel(fig)


# ---- Figure postmortem_mechanism ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("lo", "hi", "thesis", "shown"),
    [
        (-0.022, 0.006, -0.114, False),  # the default run: two points a hundredth from 0
        (-0.05, 0.0, -0.114, True),
        (-0.001, 0.001, -0.02, True),  # a span under 0.005 counts as 0.005
        (-0.001, 0.001, -0.03, False),
    ],
)
def test_the_thesis_drop_is_drawn_only_when_it_does_not_flatten_the_points(
    lo: float, hi: float, thesis: float, shown: bool
) -> None:
    from defectfusion.report.figures.postmortem_intervals import _padded, _thesis_in_view

    assert _thesis_in_view(lo, hi, thesis) is shown
    low, high = _padded(lo, hi)
    assert low < lo and high > hi and high - low >= 0.02
    assert np.isclose(_padded(-0.03, 0.0)[0], -0.03 - 0.08 * 0.03)


@pytest.mark.parametrize(("thesis", "in_view"), [(-0.114, False), (-0.03, True)])
def test_the_dose_panel_fits_its_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thesis: float, in_view: bool
) -> None:
    """Two points a hundredth from 0 (the default run's): the axis fits them, and a thesis drop
    far below goes in the title instead of stretching the axis to it; a drop nearby is drawn,
    as before."""
    monkeypatch.chdir(tmp_path)
    variants = ("zero_start", "clip_norm")
    ctx = fake_run(tmp_path, variants=variants)

    def diff(d: float, half: float) -> dict:
        return {"diff": d, "ci": [d - half, d + half]}

    _write(
        Path(ctx.layout.postmortem),
        {"adopted": "zero_start", "thesis": {"drop": thesis},
         "phase2": {v: {"mechanism": {"shift_epoch0": diff(d, h),
                                      "adaptation_epoch1": diff(0.0, 0.001)},
                        "verdict": diff(d, 1.4 * h) | {"ci_adjusted": diff(d, 1.4 * h)["ci"]}}
                    for v, d, h in zip(variants, (0.0, -0.008), (0.001, 0.01), strict=True)}},
    )  # fmt: skip
    fig, pt = draw("postmortem_mechanism", ctx)
    assert pt is not None and pt >= MIN_PRINT_PT
    ax_b = fig.axes[1]
    lo, hi = ax_b.get_ylim()
    if in_view:
        assert lo < thesis and "fuera de escala" not in ax_b.get_title()
    else:
        # the lowest interval end is -0.022: a margin below it, nowhere near -0.114
        assert -0.03 < lo < -0.022 and 0.0 < hi < 0.01
        assert "tesis: −0.114, fuera de escala" in ax_b.get_title()
