"""Figure ``per_class``: test (a) AP and (b) recall per class, Phase 1 vs Phase 2."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from defectfusion.report import PHASE1_COLOR, figure
from defectfusion.report import summary as S
from defectfusion.report.figures import Ctx, cls, models_compared, new_figure, num, variant_color


@figure(
    reads=lambda L: [L.phase1(L.main, "test_metrics.json"), *L.adopted_test()],
    caption="AP and recall per class, Phase 1 against the adopted Phase 2 variant.",
)
def per_class(ctx: Ctx) -> Figure:
    models = models_compared(ctx)
    names = S.class_order(models[0][1])
    fig, axes = new_figure(1, 2, 2.6)
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
                    p, (v or 0) + 0.01, text, ha="center", va="bottom", fontsize=8, rotation=90
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
        title_fontsize=8,
    )
    return fig
