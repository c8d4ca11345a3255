"""Figure ``phase1_curves``: Phase 1 train loss and val mAP per epoch for each backbone preset."""

from __future__ import annotations

from matplotlib.figure import Figure

from defectfusion.report import figure, model_color
from defectfusion.report import summary as S
from defectfusion.report.figures import (
    DASHES,
    Ctx,
    epoch_axis,
    epochs_plot,
    min_span,
    new_figure,
    preset_label,
)


@figure(
    reads=lambda L: [L.phase1(p, "history.jsonl") for p in L.presets],
    caption="Phase 1 training loss and validation mAP per epoch, per preset.",
)
def phase1_curves(ctx: Ctx) -> Figure:
    fig, axes = new_figure(1, 2, 2.5)
    for i, preset in enumerate(ctx.layout.presets):
        path = ctx.layout.phase1(preset, "history.jsonl")
        h = S.read_jsonl(path)
        main = preset == ctx.layout.main
        color = model_color(preset, ctx.layout.main, ctx.layout.presets)
        label = preset_label(ctx, preset, ctx.layout.main)
        epochs_plot(
            axes[0, 0], [h], "loss", color, label, DASHES[i % len(DASHES)], 1.8 if main else None
        )
        epochs_plot(
            axes[0, 1], [h], "val_map", color, label, DASHES[i % len(DASHES)], 1.8 if main else None
        )
        best = S.best_row(h, path)
        axes[0, 1].plot(
            [best["epoch"]], [best["val_map"]], marker="*", ms=9, color=color, ls="none"
        )
    min_span(axes[0, 1])  # thousandths between backbones must not fill the panel
    epoch_axis(axes[0, 0], "pérdida de entrenamiento")
    epoch_axis(axes[0, 1], "mAP@[.50:.95] de validación")
    axes[0, 0].set_title("Pérdida de entrenamiento")
    axes[0, 1].set_title("mAP de validación (★ mejor época)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)))
    return fig
