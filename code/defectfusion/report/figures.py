"""The thesis's figures, as PNG (200 dpi) and PDF, from the results files.

Drawn with matplotlib's object API (no pyplot, no display: headless), one style for all:
a 6.3-inch text width, 7-9 pt type. Every label is in Spanish, like the book (class names
from ``report.CLASS_NAMES_ES``, variants from ``VARIANT_NAMES_ES``); numbers in the text of a
figure use the book's conventions (decimal point, U+2212 minus). Colours: one per model in
every figure, from ``report.MODEL_COLORS`` (Phase 1's main model black, zero-start blue,
naive vermilion, frozen0 green, ...; the CNN baselines sky blue and brown).

=====================  =====================================================================
``dataset_examples``   training images with their boxes, one row per class (that class's
                       boxes drawn bold, the others thin and dashed)
``phase1_curves``      Phase 1 train loss and val mAP per epoch for each backbone preset
``postmortem``         Phase 2 per epoch for each variant (epoch 0 = before any update):
                       (a) train loss over its epoch-1 value (focal and MAL differ in
                       scale), (b) val mAP, (c) val critical recall, with Phase 1's best val
                       level; (b) and (c) span at least 0.1 so thousandths do not fill them
``initialisation``     zero-start vs naive over the first epochs: (a) val mAP with Phase 1's
                       level, (b) train loss
``gate_dynamics``      (a) alpha - alpha0, (b) tau, (c) ||W_proj|| - ||W_proj||0 at each
                       Phase 2 training step, per variant
``confusion``          row-normalised test confusion matrices in % (background row: false
                       positives; background column: missed boxes), (a) Phase 1, (b) Phase 2
``per_class``          test (a) AP and (b) recall per class, Phase 1 vs Phase 2
``pr_curves``          test precision-recall curves of the critical classes (COCO's
                       interpolated precision at 101 recall points, maxDets 100), IoU .50
                       and .75, Phase 1 vs Phase 2; the APs in each panel's title
``qualitative``        test images where one model found a critical defect and the other
                       did not (criteria below); no text over the images
``prompt_similarity``  cosine similarity between the class-prompt embeddings
=====================  =====================================================================

"Phase 1" is the main preset's val-selected checkpoint; "Phase 2" the adopted variant
(zero-start) from the first seed, its val-selected checkpoint (``Layout.adopted``). Where
several seeds ran, curves show their mean and a min-max band.

Qualitative selection, automatic: a model *finds* a critical-class ground-truth box of a
test image when one of its detections of the same class with score >= eval.score_threshold
overlaps it with IoU >= 0.5. Candidates are the boxes one model finds and the other does
not; the gap of a candidate is the finder's best matching score minus the other model's best
score for a same-class detection at IoU >= 0.5 (any score; 0 if none). Per image the largest
gap counts; images are ranked by it (ties: image id) and the top four of each direction
are shown with both models' detections above the threshold, coloured by class; each panel's
title says what that model made of the box (found, with its score; or the class it saw
there instead). A direction without candidates is said so in its heading.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless, whatever MPLBACKEND says

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image

from defectfusion.data.coco import category_names, images_dir, load_json
from defectfusion.errors import UserError
from defectfusion.fsutil import atomic_write
from defectfusion.metrics import box_iou, precision_recall, row_normalized
from defectfusion.report import (
    BACKBONE_NAMES_ES,
    FIGURES,
    MODEL_COLORS,
    PARAM_SECTIONS,
    PHASE1_COLOR,
    VARIANT_NAMES_ES,
    Layout,
    backbone_of,
    chosen,
    class_name_es,
    model_color,
    postmortem_figures,
    text_encoder_es,
    variant_name_es,
)
from defectfusion.report import provenance as prov
from defectfusion.report import summary as S

WIDTH = 6.3  # inches: a thesis text width
STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.titlesize": 8.5,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.4,
    "lines.markersize": 3.5,
    "pdf.fonttype": 42,  # TrueType: text stays text in the PDF
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.03,
}
# Colours: one per model in every figure, from report/__init__.py (MODEL_COLORS: Okabe-Ito,
# distinguishable with colour-blindness; in greyscale print the line styles tell them apart).
VARIANT_COLORS = {v: MODEL_COLORS[v] for v in VARIANT_NAMES_ES}
DASHES = ["-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1))]
# Boxes drawn on metal: saturated hues that stand out on grey.
CLASS_COLORS = ["#1f77b4", "#ff7f0e", "#e41a1c", "#ffd700", "#17becf", "#e377c2", "#2ca02c"]


def variant_color(layout: Layout, variant: str) -> str:
    return model_color(variant, order=layout.variants)


def num(value: float, spec: str = ".2f") -> str:
    """A number in a figure's text as in the book: decimal point, U+2212 minus, no -0.00."""
    text = format(value, spec)
    if float(text) == 0:
        text = text.lstrip("+-")
    return text.replace("-", "\u2212")


def cls(name: str) -> str:
    return class_name_es(name)


def variant_dash(layout: Layout, variant: str) -> Any:
    return DASHES[layout.variants.index(variant) % len(DASHES)]


@dataclass
class Ctx:
    values: dict[str, Any]
    layout: Layout

    @cached_property
    def classes(self) -> list[str]:
        return category_names(load_json(self.layout.split("test")))

    @cached_property
    def critical_ids(self) -> list[int]:
        S.critical_names(self.classes, self.values["data"]["critical_classes"], "config")
        return list(self.values["data"]["critical_classes"])

    @property
    def critical(self) -> list[str]:
        return [self.classes[i] for i in self.critical_ids]

    @property
    def score_threshold(self) -> float:
        return float(self.values["eval"]["score_threshold"])

    def phase1_label(self) -> str:
        return f"Fase 1 ({preset_label(self.layout.main)})"

    def phase2_label(self) -> str:
        v, s = self.layout.adopted
        seed = f", semilla {s}" if len(self.layout.seeds) > 1 else ""
        return f"Fase 2 ({variant_name_es(v).lower()}{seed})"


def preset_label(preset: str, main: str | None = None) -> str:
    name = BACKBONE_NAMES_ES.get(backbone_of(preset) or "", preset)
    return f"{name} (principal)" if preset == main else name


def _figure(
    rows: int, cols: int, height: float, width: float = WIDTH, **kw: Any
) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def _no_ticks(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _say(ax: Any, text: str) -> None:
    """A panel that only holds a sentence (nothing to draw)."""
    _no_ticks(ax)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)


def _image(ctx: Ctx, file_name: str) -> np.ndarray:
    path = images_dir(ctx.layout.data_dir) / file_name
    if not path.is_file():
        raise UserError(f"{path}: image not found")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _box(ax: Any, bbox: Sequence[float], color: str, lw: float = 1.4, ls: Any = "-") -> None:
    x, y, w, h = bbox
    ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=color, linewidth=lw, linestyle=ls))


# ---- the figures -----------------------------------------------------------------------------


def dataset_examples(ctx: Ctx) -> Figure:
    gt = load_json(ctx.layout.split("train"))
    names = category_names(gt)
    per_image: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in gt["images"]}
    for ann in gt["annotations"]:
        per_image[ann["image_id"]].append(ann)
    images = {im["id"]: im for im in gt["images"]}
    n_cols = 4
    fig, axes = _figure(len(names), n_cols, WIDTH / n_cols * len(names) * 0.92)
    for k, name in enumerate(names):
        # The cleanest examples first: fewest boxes of other classes, then image id.
        having = [i for i, anns in per_image.items() if any(a["category_id"] == k for a in anns)]
        having.sort(key=lambda i: (sum(a["category_id"] != k for a in per_image[i]), i))
        for j in range(n_cols):
            ax = axes[k, j]
            _no_ticks(ax)
            if j >= len(having):
                continue
            im = images[having[j]]
            ax.imshow(_image(ctx, im["file_name"]), interpolation="nearest")
            for a in per_image[im["id"]]:
                if a["category_id"] == k:
                    _box(ax, a["bbox"], CLASS_COLORS[k % len(CLASS_COLORS)], lw=1.6)
                else:
                    _box(ax, a["bbox"], "white", lw=0.7, ls="--")
            ax.set_title(f"imagen {im['id']}", fontsize=6.5, pad=2)
        mark = " (crítica)" if k in ctx.critical_ids else ""
        axes[k, 0].set_ylabel(f"{cls(name)}{mark}", fontsize=8, fontweight="bold" if mark else None)
        if not having:
            axes[k, 0].text(
                0.5,
                0.5,
                "sin imagen de entrenamiento",
                ha="center",
                va="center",
                transform=axes[k, 0].transAxes,
            )
    return fig


def _epochs_plot(
    ax: Any,
    histories: list[list[dict[str, Any]]],
    key: str,
    color: str,
    label: str,
    ls: Any = "-",
    lw: float | None = None,
) -> None:
    """Mean over seeds of `key` per epoch, with a min-max band when there are several."""
    epochs = sorted({r["epoch"] for h in histories for r in h if r.get(key) is not None})
    if not epochs:
        return
    vals = [
        [r[key] for h in histories for r in h if r["epoch"] == e and r.get(key) is not None]
        for e in epochs
    ]
    marker = "o" if len(epochs) <= 25 else None  # markers clutter long runs
    ax.plot(
        epochs, [np.mean(v) for v in vals], color=color, ls=ls, lw=lw, marker=marker, label=label
    )
    if len(histories) > 1:
        ax.fill_between(
            epochs, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.15, lw=0
        )


def _epoch_axis(ax: Any, ylabel: str) -> None:
    ax.set_xlabel("época")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def phase1_curves(ctx: Ctx) -> Figure:
    fig, axes = _figure(1, 2, 2.5)
    for i, preset in enumerate(ctx.layout.presets):
        path = ctx.layout.phase1(preset, "history.jsonl")
        h = S.read_jsonl(path)
        main = preset == ctx.layout.main
        color = model_color(preset, ctx.layout.main, ctx.layout.presets)
        label = preset_label(preset, ctx.layout.main)
        _epochs_plot(
            axes[0, 0], [h], "loss", color, label, DASHES[i % len(DASHES)], 1.8 if main else None
        )
        _epochs_plot(
            axes[0, 1], [h], "val_map", color, label, DASHES[i % len(DASHES)], 1.8 if main else None
        )
        best = S.best_row(h, path)
        axes[0, 1].plot(
            [best["epoch"]], [best["val_map"]], marker="*", ms=9, color=color, ls="none"
        )
    _min_span(axes[0, 1])  # thousandths between backbones must not fill the panel
    _epoch_axis(axes[0, 0], "pérdida de entrenamiento")
    _epoch_axis(axes[0, 1], "mAP@[.50:.95] de validación")
    axes[0, 0].set_title("Pérdida de entrenamiento")
    axes[0, 1].set_title("mAP de validación (★ mejor época)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)))
    return fig


def _phase2_histories(ctx: Ctx, variant: str) -> list[list[dict[str, Any]]]:
    return [S.read_jsonl(ctx.layout.phase2(variant, s, "history.jsonl")) for s in ctx.layout.seeds]


def _phase1_best(ctx: Ctx) -> dict[str, Any]:
    path = ctx.layout.phase1(ctx.layout.main, "history.jsonl")
    return S.best_row(S.read_jsonl(path), path)


def _reference(ax: Any, value: float | None, label: str) -> None:
    if value is not None:
        ax.axhline(value, color=PHASE1_COLOR, ls=(0, (4, 2)), lw=1.0, label=label, zorder=1)


def _min_span(ax: Any, span: float = 0.1) -> None:
    """At least `span` on the y axis: a difference of a few thousandths must not fill a panel
    (the curves carry no interval; the test differences with theirs are in the tables)."""
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        mid = (lo + hi) / 2
        lo, hi = max(0.0, mid - span / 2), mid + span / 2
        ax.set_ylim(lo, max(hi, lo + span))


def _relative_loss(histories: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Each run's loss over its first logged loss: focal and MAL losses differ in scale."""
    out = []
    for h in histories:
        first = next((r["loss"] for r in h if r.get("loss")), None)
        out.append(
            [{**r, "loss_rel": r["loss"] / first} for r in h if first and r.get("loss") is not None]
        )
    return out


def postmortem(ctx: Ctx) -> Figure:
    fig, axes = _figure(1, 3, 2.6)
    best = _phase1_best(ctx)
    panels = [
        ("loss_rel", "pérdida / pérdida de la época 1", "(a) Pérdida relativa"),
        ("val_map", "mAP@[.50:.95] de validación", "(b) mAP de validación"),
        ("val_critical_recall", "recall crítico de validación", "(c) Recall crítico de validación"),
    ]
    for ax, (key, ylabel, title) in zip(axes[0], panels, strict=True):
        for v in ctx.layout.variants:
            hs = _phase2_histories(ctx, v)
            _epochs_plot(
                ax,
                _relative_loss(hs) if key == "loss_rel" else hs,
                key,
                variant_color(ctx.layout, v),
                variant_name_es(v),
                variant_dash(ctx.layout, v),
            )
        if key != "loss_rel":  # Phase 1 trained with another loss: its level is no reference
            _reference(ax, best.get(key), "Fase 1, mejor época de validación")
            _min_span(ax)
        _epoch_axis(ax, ylabel)
        ax.set_title(title)
    handles, labels = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)))
    return fig


def initialisation(ctx: Ctx, max_epoch: int = 10) -> Figure:
    fig, axes = _figure(1, 2, 2.6)
    shown = 0
    for v in ctx.layout.init_variants:
        hs = [[r for r in h if r["epoch"] <= max_epoch] for h in _phase2_histories(ctx, v)]
        shown = max([shown, *(r["epoch"] for h in hs for r in h)])
        for ax, key in zip(axes[0], ("val_map", "loss"), strict=True):
            _epochs_plot(
                ax,
                hs,
                key,
                variant_color(ctx.layout, v),
                variant_name_es(v),
                variant_dash(ctx.layout, v),
            )
    _reference(axes[0, 0], _phase1_best(ctx).get("val_map"), "Fase 1, mejor época de validación")
    _min_span(axes[0, 0])
    _epoch_axis(axes[0, 0], "mAP@[.50:.95] de validación")
    _epoch_axis(axes[0, 1], "pérdida de entrenamiento")
    axes[0, 0].set_title(f"(a) mAP de validación, épocas 0 a {shown} (0: sin entrenar)")
    axes[0, 1].set_title("(b) Pérdida de entrenamiento")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)))
    return fig


def gate_dynamics(ctx: Ctx) -> Figure:
    """Changes since initialisation for alpha and ||W_proj||: naive starts at alpha = 0.1 and
    a 100x larger W_proj, which would flatten zero-start's curves on a shared absolute axis.
    The initial values (the epoch-0 row, step 0) are in the legend."""
    fig, axes = _figure(1, 3, 2.5)
    panels = [
        ("alpha", "(a) α − α₀ (compuerta)", True),
        ("tau", "(b) τ (temperatura)", False),
        ("w_proj_norm", "(c) ‖W_proj‖ − ‖W_proj‖₀", True),
    ]
    for v in ctx.layout.variants:
        for k, s in enumerate(ctx.layout.seeds):
            start = S.epoch_row(S.read_jsonl(ctx.layout.phase2(v, s, "history.jsonl")), 0) or {}
            steps = [{"step": 0, **start}, *S.read_jsonl(ctx.layout.phase2(v, s, "steps.jsonl"))]
            label = None
            if k == 0:
                a0, w0 = start.get("alpha"), start.get("w_proj_norm")
                name = variant_name_es(v)
                label = (
                    name
                    if a0 is None or w0 is None
                    else f"{name} (α₀ = {num(a0, '.3g')}, ‖W‖₀ = {num(w0, '.3g')})"
                )
            for ax, (key, _, relative) in zip(axes[0], panels, strict=True):
                pts = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
                if not pts:
                    continue
                x, y = (np.asarray(t, dtype=float) for t in zip(*pts, strict=True))
                ax.plot(
                    x,
                    y - y[0] if relative else y,
                    color=variant_color(ctx.layout, v),
                    ls=variant_dash(ctx.layout, v),
                    label=label,
                    lw=1.2,
                )
    for ax, (_, title, relative) in zip(axes[0], panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("paso de entrenamiento")
        # Step counts reach hundreds: few ticks, so their labels stay apart.
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)
        if relative:
            ax.axhline(0, color="grey", lw=0.6, zorder=0)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if not handles:
        _say(axes[0, 1], "la Fase 2 no registró ningún paso de entrenamiento")
    else:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(2, len(labels)))
    return fig


def _models(ctx: Ctx) -> list[tuple[str, dict[str, Any]]]:
    v, s = ctx.layout.adopted
    return [
        (ctx.phase1_label(), load_json(ctx.layout.phase1(ctx.layout.main, "test_metrics.json"))),
        (ctx.phase2_label(), load_json(ctx.layout.phase2(v, s, "test_metrics.json"))),
    ]


def confusion(ctx: Ctx) -> Figure:
    models = _models(ctx)
    k = len(models[0][1]["confusion"]["classes"])
    fig, axes = _figure(1, 2, 2.9)
    image = None
    for ax, (label, m) in zip(axes[0], models, strict=True):
        conf = m["confusion"]
        norm = row_normalized(conf)
        counts = np.asarray(conf["matrix"])
        shown = np.ma.masked_invalid(norm)
        cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#dddddd")
        image = ax.imshow(100 * shown, cmap=cmap, vmin=0, vmax=100)
        ax.grid(False)
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{100 * norm[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if norm[i, j] > 0.6 else "black",
                    )
        names = [cls(n) for n in conf["classes"]]
        rows = [f"{n} ({int(t)})" for n, t in zip(names, counts.sum(1), strict=True)]
        ax.set_xticks(range(k), names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(k), rows)
        for t in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
            if t.get_text().split(" ")[0] in {cls(c) for c in ctx.critical}:
                t.set_fontweight("bold")
        ax.set_xlabel("clase predicha")
        if ax is axes[0, 0]:
            ax.set_ylabel("clase real (cajas)")
        ax.set_title(f"({'ab'[axes[0].tolist().index(ax)]}) {label}")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="% de la fila")
    m0 = models[0][1]["confusion"]
    fig.suptitle(
        f"Cada celda: % de su fila. Detecciones con puntuación ≥ {num(m0['score_threshold'], 'g')}"
        f" e IoU ≥ {num(m0['iou_threshold'], 'g')}.\nFila «Fondo»: falsos positivos (entre "
        "paréntesis, cuántos); columna «Fondo»: cajas no detectadas. Clases críticas en negrita.",
        fontsize=7,
    )
    return fig


def per_class(ctx: Ctx) -> Figure:
    models = _models(ctx)
    names = S.class_order(models[0][1])
    fig, axes = _figure(1, 2, 2.6)
    x = np.arange(len(names))
    width = 0.38
    colors = [PHASE1_COLOR, variant_color(ctx.layout, ctx.layout.adopted[0])]
    hatches = ["", "////"]
    for ax, (key, title) in zip(
        axes[0],
        [("ap", "(a) AP@[.50:.95]"), ("recall", "(b) Recall (AR@[.50:.95])")],
        strict=True,
    ):
        for i, (label, m) in enumerate(models):
            vals = [m["per_class"][n].get(key) for n in names]
            pos = x + (i - 0.5) * width
            ax.bar(
                pos,
                [np.nan if v is None else v for v in vals],
                width,
                label=label,
                color=colors[i],
                alpha=0.85 if i == 0 else 0.9,
                hatch=hatches[i],
                edgecolor="white",
                lw=0,
            )
            # Values printed: a bar of height 0 must not read as a missing one.
            for p, v in zip(pos, vals, strict=True):
                text = "n/d" if v is None else num(v)
                ax.text(
                    p, (v or 0) + 0.01, text, ha="center", va="bottom", fontsize=5.5, rotation=90
                )
        ax.set_xticks(
            x,
            [f"{cls(n)}†" if n in ctx.critical else cls(n) for n in names],
            rotation=30,
            ha="right",
            rotation_mode="anchor",
        )
        for t in ax.get_xticklabels():
            if t.get_text().endswith("†"):
                t.set_fontweight("bold")
        ax.set_ylim(0, 1.15)  # room for the values above a bar of height 1, under the title
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_title(title)
        ax.grid(axis="x", visible=False)
    axes[0, 0].set_ylabel("valor en prueba")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncol=2,
        title="† clase crítica",
        title_fontsize=7,
    )
    return fig


def pr_curves(ctx: Ctx) -> Figure:
    gt = load_json(ctx.layout.split("test"))
    v, s = ctx.layout.adopted
    models = [
        (
            "F1",
            ctx.phase1_label(),
            PHASE1_COLOR,
            ctx.layout.phase1(ctx.layout.main, "test_metrics.predictions.json"),
        ),
        (
            "F2",
            ctx.phase2_label(),
            variant_color(ctx.layout, v),
            ctx.layout.phase2(v, s, "test_metrics.predictions.json"),
        ),
    ]
    crit = ctx.critical_ids
    ious = ((0.5, "-"), (0.75, "--"))
    fig, axes = _figure(1, max(1, len(crit)), 2.4, sharey=True)
    ap_text: dict[int, list[str]] = {c: [] for c in crit}
    for short, _, color, path in models:
        results = load_json(path)
        precision, params = precision_recall(gt, results) if results else (None, None)
        for ax, c in zip(axes[0], crit, strict=False):
            if precision is None:
                ap_text[c].append(f"{short}: sin detecciones")
                continue
            k = list(params.catIds).index(c)
            aps = []
            for t, ls in ious:
                curve = precision[int(np.argmin(np.abs(params.iouThrs - t))), :, k]
                ax.plot(params.recThrs, curve, color=color, ls=ls, lw=1.2)
                aps.append(num(np.nanmean(curve)) if np.isfinite(curve).any() else "n/d")
            ap_text[c].append(f"{short}: AP50 {aps[0]}, AP75 {aps[1]}")
    for ax, c in zip(axes[0], crit, strict=False):
        n = sum(1 for a in gt["annotations"] if a["category_id"] == c)
        # The APs go above the panel, never over the curves.
        ax.set_title(f"{cls(ctx.classes[c])} ({n} cajas)\n" + "\n".join(ap_text[c]))
        ax.set_xlabel("recall")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
    axes[0, 0].set_ylabel("precisión (interpolada)")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=color, label=label) for _, label, color, _ in models]
    handles += [Line2D([], [], color="grey", ls=ls, label=f"IoU {t:.2f}") for t, ls in ious]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles))
    return fig


# ---- qualitative -----------------------------------------------------------------------------


def _best_match(
    dets: list[dict[str, Any]], box: dict[str, Any], iou_min: float = 0.5
) -> float | None:
    """The best score among same-class detections overlapping `box` at IoU >= iou_min."""
    same = [d for d in dets if d["category_id"] == box["category_id"]]
    if not same:
        return None
    ious = box_iou(same, [box])[:, 0]
    scores = [d["score"] for d, i in zip(same, ious, strict=True) if i >= iou_min]
    return max(scores) if scores else None


def qualitative_cases(
    gt: dict[str, Any],
    preds_a: list[dict[str, Any]],
    preds_b: list[dict[str, Any]],
    critical: Sequence[int],
    score_threshold: float,
    top: int = 4,
) -> dict[str, list[dict[str, Any]]]:
    """``{"b_not_a": [...], "a_not_b": [...]}``: the module docstring's selection."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in gt["annotations"]:
        if ann["category_id"] in critical and not ann.get("iscrowd", 0):
            by_image.setdefault(ann["image_id"], []).append(ann)
    dets = {"a": {}, "b": {}}
    for key, preds in (("a", preds_a), ("b", preds_b)):
        for d in preds:
            dets[key].setdefault(d["image_id"], []).append(d)
    cases: dict[str, list[dict[str, Any]]] = {"b_not_a": [], "a_not_b": []}
    for image_id in sorted(by_image):
        best: dict[str, dict[str, Any]] = {}
        for box in by_image[image_id]:
            sa = _best_match(dets["a"].get(image_id, []), box)
            sb = _best_match(dets["b"].get(image_id, []), box)
            found_a = sa is not None and sa >= score_threshold
            found_b = sb is not None and sb >= score_threshold
            if found_a == found_b:
                continue
            direction = "b_not_a" if found_b else "a_not_b"
            gap = (sb if found_b else sa) - ((sa if found_b else sb) or 0.0)
            case = {"image_id": image_id, "box": box, "gap": gap, "score_a": sa, "score_b": sb}
            if direction not in best or gap > best[direction]["gap"]:
                best[direction] = case
        for direction, case in best.items():
            cases[direction].append(case)
    for direction in cases:
        cases[direction].sort(key=lambda c: (-c["gap"], c["image_id"]))
        cases[direction] = cases[direction][:top]
    return cases


def qualitative(ctx: Ctx, per_row: int = 2) -> Figure:
    gt = load_json(ctx.layout.split("test"))
    v, s = ctx.layout.adopted
    preds = {
        "a": load_json(ctx.layout.phase1(ctx.layout.main, "test_metrics.predictions.json")),
        "b": load_json(ctx.layout.phase2(v, s, "test_metrics.predictions.json")),
    }
    thr = ctx.score_threshold
    cases = qualitative_cases(gt, preds["a"], preds["b"], ctx.critical_ids, thr, top=2 * per_row)
    images = {im["id"]: im for im in gt["images"]}
    short = {"a": "F1", "b": "F2"}
    sections = [
        ("b_not_a", f"(a) {ctx.phase2_label()} encuentra el defecto; {ctx.phase1_label()}, no"),
        ("a_not_b", f"(b) {ctx.phase1_label()} encuentra el defecto; {ctx.phase2_label()}, no"),
    ]
    # Each case is two panels side by side (F1 | F2), `per_row` cases a row; a direction
    # without cases is one short line that says so. No text on the images: what each model
    # sees on the defect goes in the panel's title, the class colours in the legend.
    rows = {d: -(-len(cases[d]) // per_row) for d, _ in sections}
    panel = WIDTH / (2 * per_row)
    heights = [0.35 + (rows[d] * panel * 1.15 if rows[d] else 0.1) for d, _ in sections]
    fig = Figure(figsize=(WIDTH, sum(heights) + 0.45), layout="constrained")
    subfigs = fig.subfigures(len(sections), 1, height_ratios=heights)
    used: set[int] = set()
    for sub, (direction, heading) in zip(subfigs, sections, strict=True):
        if not cases[direction]:
            sub.suptitle(
                f"{heading}:\nninguna imagen de prueba cumple el criterio",
                fontsize=7.5,
                fontweight="bold",
            )
            continue
        sub.suptitle(heading, fontsize=7.5, fontweight="bold")
        axes = sub.subplots(rows[direction], 2 * per_row, squeeze=False)
        for ax in axes.flat:
            _no_ticks(ax)
        for n, case in enumerate(cases[direction]):
            im, box = images[case["image_id"]], case["box"]
            pixels = _image(ctx, im["file_name"])
            for col, key in enumerate(("a", "b")):
                ax = axes[n // per_row, 2 * (n % per_row) + col]
                ax.imshow(pixels, interpolation="nearest")
                _box(ax, box["bbox"], "white", lw=1.3, ls=(0, (3, 2)))
                shown = [d for d in preds[key] if d["image_id"] == im["id"] and d["score"] >= thr]
                near = box_iou(shown, [box])[:, 0] if shown else np.zeros(0)
                # The detection that finds the defect is drawn first and thicker, so a box of
                # another class on the same spot (drawn over it) leaves it visible as a rim.
                finds = [
                    i for i, (d, o) in enumerate(zip(shown, near, strict=True))
                    if d["category_id"] == box["category_id"] and o >= 0.5
                ]  # fmt: skip
                best = max(finds, key=lambda i: shown[i]["score"]) if finds else None
                order = sorted(range(len(shown)), key=lambda i: (i != best, shown[i]["score"]))
                for i in order:
                    d, overlap = shown[i], near[i]
                    used.add(d["category_id"])
                    color = CLASS_COLORS[d["category_id"] % len(CLASS_COLORS)]
                    lw = 3.2 if i == best else 1.3 if overlap >= 0.1 else 0.6
                    _box(ax, d["bbox"], color, lw=lw)
                score = case[f"score_{key}"]
                if score is not None and score >= thr:
                    verdict = f"lo encuentra ({num(score)})"
                else:
                    # What the model sees there instead, if anything (IoU >= 0.5, any class).
                    other = [(d, o) for d, o in zip(shown, near, strict=True) if o >= 0.5]
                    if other:
                        d = max(other, key=lambda t: t[0]["score"])[0]
                        verdict = f"ve {cls(ctx.classes[d['category_id']])} ({num(d['score'])})"
                    else:
                        verdict = "no lo encuentra"
                ax.set_title(f"{short[key]}: {verdict}", fontsize=6, pad=2)
                if col == 0:
                    ax.set_ylabel(
                        f"imagen {im['id']}: {cls(ctx.classes[box['category_id']])}", fontsize=6
                    )
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="black", ls=(0, (3, 2)), label="caja real del defecto")]
    handles += [
        Line2D([], [], color=CLASS_COLORS[c % len(CLASS_COLORS)], lw=2, label=cls(ctx.classes[c]))
        for c in sorted(used)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)))
    return fig


def prompt_similarity(ctx: Ctx) -> Figure:
    data = load_json(ctx.layout.text)
    cos = np.asarray(data["cosine"], dtype=float)
    names = [cls(n) for n in data["class_names"]]
    fig, axes = _figure(1, 1, 3.6, width=4.6)
    ax = axes[0, 0]
    # The colours span the off-diagonal range (the diagonal is 1 by definition, greyed), so
    # the pairs the text can hardly tell apart stand out.
    diag = np.eye(len(names), dtype=bool)
    off = cos[~diag]
    lo, hi = (float(off.min()), float(off.max())) if off.size else (0.0, 1.0)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_where(diag, cos), cmap=cmap, vmin=lo, vmax=max(hi, lo + 1e-6))
    ax.grid(False)
    for i in range(len(names)):
        for j in range(len(names)):
            bright = i != j and (cos[i, j] - lo) / max(1e-9, hi - lo) > 0.6
            ax.text(
                j,
                i,
                num(cos[i, j]),
                ha="center",
                va="center",
                fontsize=6.5,
                color="black" if bright or i == j else "white",
            )
    crit = {cls(c) for c in ctx.critical}
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(names)), names)
    for t in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        if t.get_text() in crit:
            t.set_fontweight("bold")
    ax.set_title(
        f"Descripciones de las clases, {text_encoder_es(data.get('encoder', '?'))} "
        f"(D_t = {data.get('dim', '?')})"
        "\nclases críticas en negrita",
        fontsize=7.5,
    )
    fig.colorbar(image, ax=ax, shrink=0.8, label="similitud coseno")
    return fig


DRAW: dict[str, Callable[[Ctx], Figure]] = {
    "dataset_examples": dataset_examples,
    "phase1_curves": phase1_curves,
    "postmortem": postmortem,
    "initialisation": initialisation,
    "gate_dynamics": gate_dynamics,
    "confusion": confusion,
    "per_class": per_class,
    "pr_curves": pr_curves,
    "qualitative": qualitative,
    "prompt_similarity": prompt_similarity,
    **postmortem_figures.DRAW,  # issue 13: the post-mortem's forest plot and drift by epoch
}
assert tuple(DRAW) == FIGURES


def save(fig: Figure, out: Path, name: str, record: dict[str, Any]) -> list[Path]:
    """PNG and PDF, each with the provenance record in its metadata; no timestamp."""
    line = prov.one_line(record)
    png_meta = {"Title": name, "Provenance": line}
    pdf_meta = {
        "Title": name,
        "Subject": line,
        "Keywords": prov.keywords(record),
        "Creator": "defectfusion report",
        "CreationDate": None,
    }
    return [
        atomic_write(
            out / f"{name}.png", lambda t: fig.savefig(t, format="png", metadata=png_meta)
        ),
        atomic_write(
            out / f"{name}.pdf", lambda t: fig.savefig(t, format="pdf", metadata=pdf_meta)
        ),
    ]


def figure_styles(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``figure_style`` of the config, checked: known figures, real matplotlib rcParams.

    Per figure, so that restyling one figure redraws only that one (Snakemake's params).
    """
    styles = values.get("figure_style") or {}
    for name, style in styles.items():
        if name not in FIGURES:
            raise UserError(f"figure_style.{name}: no such figure; figures are {list(FIGURES)}")
        if not isinstance(style, dict):
            raise UserError(f"figure_style.{name}: expected a mapping of rcParams, got {style!r}")
        for key in style:
            if key not in matplotlib.rcParams:
                raise UserError(f"figure_style.{name}: {key!r} is not a matplotlib rcParam")
            try:
                matplotlib.rcParams.validate[key](style[key])
            except (ValueError, TypeError) as e:
                raise UserError(f"figure_style.{name}.{key}: {e}") from None
    return styles


def write_figures(
    values: dict[str, Any],
    out: str | Path,
    only: Sequence[str] | None = None,
    rule: str = "manual",
    results: str = "results",
) -> list[Path]:
    """Draw figures `only` (default: all) as ``out/NAME.{png,pdf}`` and their sidecars."""
    names = chosen(only, FIGURES, "figure")
    layout = Layout.from_config(values, results)
    ctx = Ctx(values, layout)
    params = prov.params_subset(values, PARAM_SECTIONS)
    styles = figure_styles(values)
    written: list[Path] = []
    for name in names:
        style = styles.get(name, {})
        fig_params = {**params, "figure_style": {name: style}} if style else params
        record = prov.make_record(
            f"figures/{name}", rule, fig_params, layout.inputs("figures", name)
        )
        with matplotlib.rc_context({**STYLE, **style}):
            fig = DRAW[name](ctx)
            paths = save(fig, Path(out), name, record)
        prov.write_sidecar(results, record, paths)
        written += paths
    return written
