"""Figure ``qualitative``: test images where one model found a critical defect and the other did
not (criteria below); no text over the images.

Qualitative selection, automatic: a model *finds* a critical-class ground-truth box of a
test image when one of its detections of the same class with score >= eval.score_threshold
overlaps it with IoU >= 0.5. Candidates are the boxes one model finds and the other does
not; the gap of a candidate is the finder's best matching score minus the other model's best
score for a same-class detection at IoU >= 0.5 (any score; 0 if none). Phase 1 is the main
preset; Phase 2 is the adopted variant, every seed: the candidates are pooled over its seeds
(one seed alone rarely has any), each image once per direction, with the seed of its largest
gap. Images are ranked by that gap (ties: image id, then seed) and the top four of each
direction are shown with both models' detections above the threshold, coloured by class;
each case says which seed's Phase 2 model it shows, and each panel's title what that model
made of the box (found, with its score; or the class it saw there instead). A direction
without candidates says so in its heading, with the criterion and how many seeds were
searched.
"""

from __future__ import annotations

import textwrap

import numpy as np
from matplotlib.figure import Figure

from defectfusion.core.jsonio import load_json
from defectfusion.evaluation.metrics import box_iou, pooled_cases
from defectfusion.report import figure, variant_name_es
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

PREDICTIONS = "test_metrics.predictions.json"


@figure(
    reads=lambda L: [L.split("test"), *L.qualitative_predictions()],
    caption=(
        "Test images where one model found a critical defect and the other did not, pooled "
        "over the adopted variant's seeds (if there are any)."
    ),
)
def qualitative(ctx: Ctx, per_row: int = 2) -> Figure:
    gt = load_json(ctx.layout.split("test"))
    v = ctx.layout.adopted[0]
    seeds = list(ctx.layout.seeds)
    phase1 = load_json(ctx.layout.phase1(ctx.layout.main, PREDICTIONS))
    phase2 = {s: load_json(ctx.layout.phase2(v, s, PREDICTIONS)) for s in seeds}
    thr = ctx.score_threshold
    cases = pooled_cases(gt, phase1, phase2, ctx.critical_ids, thr, top=2 * per_row)
    images = {im["id"]: im for im in gt["images"]}
    short = {"a": "Fase 1", "b": "Fase 2"}
    p1, p2 = ctx.phase1_label(), f"Fase 2 ({variant_name_es(v).lower()})"
    sections = [
        ("b_not_a", f"(a) {p2} encuentra el defecto; {p1}, no"),
        ("a_not_b", f"(b) {p1} encuentra el defecto; {p2}, no"),
    ]
    n_seeds = len(seeds)
    searched = f"con ninguna de las {n_seeds} semillas" if n_seeds > 1 else "con la única semilla"
    none = (
        f"ninguna imagen de prueba, {searched} de la Fase 2 (encontrar: una detección de la "
        f"clase del defecto con IoU ≥ 0.5 y puntuación ≥ {num(thr)})"
    )
    # Each case is two panels side by side (Fase 1 | Fase 2), `per_row` cases a row; a direction
    # without cases is a few lines that say so. No text on the images: what each model
    # sees on the defect goes in the panel's title, the class colours in the legend.
    rows = {d: -(-len(cases[d]) // per_row) for d, _ in sections}
    panel = WIDTH / (2 * per_row)
    heights = [0.35 + (rows[d] * panel * 1.15 if rows[d] else 0.3) for d, _ in sections]
    fig = Figure(figsize=(WIDTH, sum(heights) + 0.45), layout="constrained")
    subfigs = fig.subfigures(len(sections), 1, height_ratios=heights)
    used: set[int] = set()
    for sub, (direction, heading) in zip(subfigs, sections, strict=True):
        if not cases[direction]:
            # at 8 pt bold, about 90 characters fill the figure's width
            sub.suptitle(f"{heading}:\n{textwrap.fill(none, 90)}", fontsize=8, fontweight="bold")
            continue
        sub.suptitle(heading, fontsize=8, fontweight="bold")
        axes = sub.subplots(rows[direction], 2 * per_row, squeeze=False)
        for ax in axes.flat:
            no_ticks(ax)
        for n, case in enumerate(cases[direction]):
            im, box = images[case["image_id"]], case["box"]
            pixels = load_image(ctx, im["file_name"])
            preds = {"a": phase1, "b": phase2[case["seed"]]}
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
                        f"imagen {im['id']}: {cls(ctx.classes[box['category_id']])}\n"
                        f"(Fase 2: semilla {case['seed']})",
                        fontsize=8,
                    )
    if not any(cases.values()):
        return fig  # no image: nothing for a legend to name
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="black", ls=(0, (3, 2)), label="caja real del defecto")]
    handles += [
        Line2D([], [], color=CLASS_COLORS[c % len(CLASS_COLORS)], lw=2, label=cls(ctx.classes[c]))
        for c in sorted(used)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)))
    return fig
