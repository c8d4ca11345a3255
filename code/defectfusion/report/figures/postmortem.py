"""Figure ``postmortem``: Phase 2 per epoch for each variant (epoch 0 = before any update): (a)
train loss over its epoch-1 value (focal and MAL differ in scale), (b) val mAP, (c) val critical
recall, with Phase 1's best val level; (b) and (c) span at least 0.1 so thousandths do not fill
them.
"""

from __future__ import annotations

from typing import Any

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


def _relative_loss(histories: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Each run's loss over its first logged loss: focal and MAL losses differ in scale."""
    out = []
    for h in histories:
        first = next((r["loss"] for r in h if r.get("loss")), None)
        out.append(
            [{**r, "loss_rel": r["loss"] / first} for r in h if first and r.get("loss") is not None]
        )
    return out


@figure(
    reads=lambda L: [L.phase1(L.main, "history.jsonl"), *L.all_phase2("history.jsonl")],
    caption=(
        "Validation mAP per Phase 2 epoch (0: before any update) of every variant, beside Phase "
        "1's best: the epoch-1 drop the thesis saw, or its absence."
    ),
)
def postmortem(ctx: Ctx) -> Figure:
    fig, axes = new_figure(1, 3, 2.6)
    best = phase1_best(ctx)
    panels = [
        ("loss_rel", "pérdida / pérdida de la época 1", "(a) Pérdida relativa"),
        ("val_map", "mAP@[.50:.95] de validación", "(b) mAP de validación"),
        ("val_critical_recall", "recall crítico de validación", "(c) Recall crítico de validación"),
    ]
    for ax, (key, ylabel, title) in zip(axes[0], panels, strict=True):
        for v in ctx.layout.variants:
            hs = phase2_histories(ctx, v)
            epochs_plot(
                ax,
                _relative_loss(hs) if key == "loss_rel" else hs,
                key,
                variant_color(ctx.layout, v),
                variant_name_es(v),
                variant_dash(ctx.layout, v),
                spread="none",  # nine bands would cover each other: figure postmortem_drift has them
            )
        if key != "loss_rel":  # Phase 1 trained with another loss: its level is no reference
            reference_line(ax, best.get(key), "Fase 1, mejor época de validación")
            min_span(ax)
        epoch_axis(ax, ylabel)
        ax.set_title(title)
    handles, labels = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)))
    return fig
