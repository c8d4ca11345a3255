"""Figure ``confusion``: row-normalised test confusion matrices in % (background row: false
positives; background column: missed boxes), (a) Phase 1, (b) Phase 2.
"""

from __future__ import annotations

import textwrap

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from defectfusion.evaluation.metrics import row_normalized
from defectfusion.report import figure
from defectfusion.report.figures import Ctx, cls, models_compared, new_figure, num


@figure(
    reads=lambda L: [L.phase1(L.main, "test_metrics.json"), *L.adopted_test()],
    caption="Confusion matrix at the operating point, Phase 1 and adopted Phase 2.",
)
def confusion(ctx: Ctx) -> Figure:
    models = models_compared(ctx)
    k = len(models[0][1]["confusion"]["classes"])
    fig, axes = new_figure(1, 2, 4.1)
    for ax, (label, m) in zip(axes[0], models, strict=True):
        conf = m["confusion"]
        norm = row_normalized(conf)
        counts = np.asarray(conf["matrix"])
        shown = np.ma.masked_invalid(norm)
        cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#dddddd")
        # no colour bar: every cell prints its value, the shade only guides the eye
        ax.imshow(100 * shown, cmap=cmap, vmin=0, vmax=100)
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
                        fontsize=8,
                        color="white" if norm[i, j] > 0.6 else "black",
                    )
        names = [cls(n) for n in conf["classes"]]
        # the class names once, on the left; the right panel keeps only its row counts (the
        # background row's differ), so each panel's cells are wide enough for "100" at 8 pt
        first = ax is axes[0, 0]
        rows = [f"{n} ({int(t)})" if first else f"({int(t)})"
                for n, t in zip(names, counts.sum(1), strict=True)]  # fmt: skip
        ax.set_xticks(range(k), names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(k), rows)
        for t in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
            if t.get_text().split(" ")[0] in {cls(c) for c in ctx.critical}:
                t.set_fontweight("bold")
        ax.set_xlabel("clase predicha")
        if ax is axes[0, 0]:
            ax.set_ylabel("clase real (cajas)")
        ax.set_title(f"({'ab'[axes[0].tolist().index(ax)]}) {label}")
    m0 = models[0][1]["confusion"]
    fig.suptitle(
        textwrap.fill(
            f"Cada celda: % de su fila. Detecciones con puntuación ≥ "
            f"{num(m0['score_threshold'], 'g')} e IoU ≥ {num(m0['iou_threshold'], 'g')}. Fila "
            "«Fondo»: falsos positivos (entre paréntesis, cuántos); columna «Fondo»: cajas no "
            "detectadas. Clases críticas en negrita.",
            100,  # at 8 pt, a line of the column's width
        ),
        fontsize=8,
    )
    return fig
