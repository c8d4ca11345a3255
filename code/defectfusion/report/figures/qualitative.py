"""Figure ``qualitative``: test images where one model found a critical defect and the other did
not (criteria below); no text over the images.

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

import numpy as np
from matplotlib.figure import Figure

from defectfusion.core.jsonio import load_json
from defectfusion.evaluation.metrics import box_iou, qualitative_cases
from defectfusion.report import figure
from defectfusion.report.figures import (
    CLASS_COLORS,
    WIDTH,
    Ctx,
    cls,
    draw_box,
    load_image,
    no_ticks,
    num,
)


@figure(
    reads=lambda L: [L.split("test"), *L.test_predictions()],
    caption="Test images with their boxes: hits, misses and false alarms.",
)
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
                fontsize=8,
                fontweight="bold",
            )
            continue
        sub.suptitle(heading, fontsize=8, fontweight="bold")
        axes = sub.subplots(rows[direction], 2 * per_row, squeeze=False)
        for ax in axes.flat:
            no_ticks(ax)
        for n, case in enumerate(cases[direction]):
            im, box = images[case["image_id"]], case["box"]
            pixels = load_image(ctx, im["file_name"])
            for col, key in enumerate(("a", "b")):
                ax = axes[n // per_row, 2 * (n % per_row) + col]
                ax.imshow(pixels, interpolation="nearest")
                draw_box(ax, box["bbox"], "white", lw=1.3, ls=(0, (3, 2)))
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
                    draw_box(ax, d["bbox"], color, lw=lw)
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
                ax.set_title(f"{short[key]}: {verdict}", fontsize=8, pad=2)
                if col == 0:
                    ax.set_ylabel(
                        f"imagen {im['id']}: {cls(ctx.classes[box['category_id']])}", fontsize=8
                    )
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="black", ls=(0, (3, 2)), label="caja real del defecto")]
    handles += [
        Line2D([], [], color=CLASS_COLORS[c % len(CLASS_COLORS)], lw=2, label=cls(ctx.classes[c]))
        for c in sorted(used)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)))
    return fig
