"""Figure ``postmortem``: Phase 2 per epoch for each variant (epoch 0 = before any update): (a)
train loss over its epoch-1 value (focal and MAL differ in scale), (b) val mAP, (c) val critical
recall, with Phase 1's best val level drawn over the curves; (b) and (c) span at least 0.1 so
thousandths do not fill them. Nine variants of near-equal values: each has its own colour, dash
and open marker, and its points sit a little to the side of the epoch (the first variant leftmost),
so coinciding curves do not hide each other.
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
    variant_marker,
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
        "Phase 2 per epoch (0: before any update) for every variant: relative train loss, "
        "validation mAP and critical recall (seed means), beside Phase 1's best."
    ),
)
def postmortem(ctx: Ctx, step: float = 0.07) -> Figure:
    fig, axes = new_figure(1, 3, 3.1)  # tall panels: nine near-equal curves need the height
    # Room between the panels: a y label must not reach the tick labels of the panel on its left.
    fig.get_layout_engine().set(w_pad=0.06, wspace=0.08)
    best = phase1_best(ctx)
    panels = [
        ("loss_rel", "pérdida / pérdida de la época 1", "(a) Pérdida relativa"),
        ("val_map", "mAP@[.50:.95]", "(b) mAP de validación"),
        ("val_critical_recall", "recall crítico", "(c) Recall crítico de validación"),
    ]
    n = len(ctx.layout.variants)
    for ax, (key, ylabel, title) in zip(axes[0], panels, strict=True):
        for i, v in enumerate(ctx.layout.variants):
            hs = phase2_histories(ctx, v)
            epochs_plot(
                ax,
                _relative_loss(hs) if key == "loss_rel" else hs,
                key,
                variant_color(ctx.layout, v),
                variant_name_es(v),
                variant_dash(ctx.layout, v),
                lw=1.1,
                spread="none",  # nine bands would cover each other: figure postmortem_drift has them
                marker=variant_marker(ctx.layout, v),
                shift=step * (i - (n - 1) / 2),
                hollow=True,
            )
        if key != "loss_rel":  # Phase 1 trained with another loss: its level is no reference
            reference_line(ax, best.get(key), "Fase 1, mejor época de validación")
            min_span(ax)
        epoch_axis(ax, ylabel)
        ax.set_title(title)
    handles, labels = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)))
    return fig
