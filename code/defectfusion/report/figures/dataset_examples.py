"""Figure ``dataset_examples``: training images with their boxes, one row per class (that
class's boxes drawn bold in its colour, the other classes' boxes white and dashed). A row
shows the class's cleanest images (fewest boxes of other classes, then image id), and in its
last panel the cleanest that also holds boxes of other classes, so the dashed boxes appear
wherever the class shares an image with another.
"""

from __future__ import annotations

from typing import Any

from matplotlib import patheffects
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
    caption="A few training images of each class with their boxes (others' boxes dashed).",
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
    # The other classes' boxes: white dashes on a dark rim, visible on light and dark metal.
    rim = [patheffects.withStroke(linewidth=2.4, foreground="black")]
    for k, name in enumerate(names):
        having = examples(per_image, k, n_cols)
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
                    draw_box(ax, a["bbox"], "white", lw=1.1, ls=(0, (3, 2)))
                    ax.patches[-1].set_path_effects(rim)
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


def examples(per_image: dict[int, list[dict[str, Any]]], k: int, n: int) -> list[int]:
    """Up to `n` images of class `k`, cleanest first (fewest boxes of other classes, then image
    id): the `n - 1` cleanest and, last, the cleanest with other classes' boxes in it (when
    the class has one), so a row shows what its class looks like beside the others."""

    def others(i: int) -> int:
        return sum(a["category_id"] != k for a in per_image[i])

    having = sorted(
        (i for i, anns in per_image.items() if any(a["category_id"] == k for a in anns)),
        key=lambda i: (others(i), i),
    )
    mixed = next((i for i in having if others(i) > 0), None)
    picked = [i for i in having if i != mixed][: n - 1 if mixed is not None else n]
    if mixed is not None:
        picked.append(mixed)
    rest = [i for i in having if i not in picked]
    return sorted(picked + rest[: n - len(picked)], key=lambda i: (others(i), i))
