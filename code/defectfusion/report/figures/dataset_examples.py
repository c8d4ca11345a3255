"""Figure ``dataset_examples``: training images with their boxes, one row per class (that
class's boxes drawn bold, the others thin and dashed).
"""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from defectfusion.core.jsonio import load_json
from defectfusion.data.coco import category_names
from defectfusion.report import figure
from defectfusion.report.figures import (
    CLASS_COLORS,
    WIDTH,
    Ctx,
    cls,
    draw_box,
    load_image,
    new_figure,
    no_ticks,
)


@figure(
    reads=lambda L: [L.split("train")],
    caption="A few training images of each class with their boxes.",
)
def dataset_examples(ctx: Ctx) -> Figure:
    gt = load_json(ctx.layout.split("train"))
    names = category_names(gt)
    per_image: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in gt["images"]}
    for ann in gt["annotations"]:
        per_image[ann["image_id"]].append(ann)
    images = {im["id"]: im for im in gt["images"]}
    n_cols = 4
    fig, axes = new_figure(len(names), n_cols, WIDTH / n_cols * len(names) * 0.92)
    for k, name in enumerate(names):
        # The cleanest examples first: fewest boxes of other classes, then image id.
        having = [i for i, anns in per_image.items() if any(a["category_id"] == k for a in anns)]
        having.sort(key=lambda i: (sum(a["category_id"] != k for a in per_image[i]), i))
        for j in range(n_cols):
            ax = axes[k, j]
            no_ticks(ax)
            if j >= len(having):
                continue
            im = images[having[j]]
            ax.imshow(load_image(ctx, im["file_name"]), interpolation="nearest")
            for a in per_image[im["id"]]:
                if a["category_id"] == k:
                    draw_box(ax, a["bbox"], CLASS_COLORS[k % len(CLASS_COLORS)], lw=1.6)
                else:
                    draw_box(ax, a["bbox"], "white", lw=0.7, ls="--")
            ax.set_title(f"imagen {im['id']}", fontsize=8, pad=2)
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
