"""Figure ``initialisation``: zero-start vs naive over the first epochs: (a) val mAP with Phase
1's level, (b) train loss.
"""

from __future__ import annotations

from matplotlib.figure import Figure

from defectfusion.report import figure, variant_name_es
from defectfusion.report.figures import (
    Ctx,
    epoch_axis,
    epochs_plot,
    min_span,
    new_figure,
    phase1_best,
    phase2_histories,
    reference_line,
    variant_color,
    variant_dash,
)


@figure(
    reads=lambda L: [
        L.phase1(L.main, "history.jsonl"),
        *L.all_phase2("history.jsonl", L.init_variants),
    ],
    caption="Zero-start against the naive initialisation: validation mAP per epoch.",
)
def initialisation(ctx: Ctx, max_epoch: int = 10) -> Figure:
    fig, axes = new_figure(1, 2, 2.6)
    shown = 0
    n = len(ctx.layout.init_variants)
    for i, v in enumerate(ctx.layout.init_variants):
        hs = [[r for r in h if r["epoch"] <= max_epoch] for h in phase2_histories(ctx, v)]
        shown = max([shown, *(r["epoch"] for h in hs for r in h)])
        for ax, key in zip(axes[0], ("val_map", "loss"), strict=True):
            epochs_plot(
                ax,
                hs,
                key,
                variant_color(ctx.layout, v),
                variant_name_es(v),
                variant_dash(ctx.layout, v),
                # the seeds' spread as bars, side by side: two bands covered each other
                spread="bars",
                dodge=0.06 * (i - (n - 1) / 2),
            )
    reference_line(axes[0, 0], phase1_best(ctx).get("val_map"), "Fase 1, mejor época de validación")
    min_span(axes[0, 0])
    epoch_axis(axes[0, 0], "mAP@[.50:.95] de validación")
    epoch_axis(axes[0, 1], "pérdida de entrenamiento")
    axes[0, 0].set_title(f"(a) mAP de validación, épocas 0 a {shown} (0: sin entrenar)")
    axes[0, 1].set_title("(b) Pérdida de entrenamiento")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)))
    return fig
