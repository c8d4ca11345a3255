"""Figure ``pr_curves``: test precision-recall curves of the critical classes (COCO's
interpolated precision at 101 recall points, maxDets 100), IoU .50 and .75, Phase 1 vs Phase 2;
the APs in each panel's title.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from defectfusion.core.jsonio import load_json
from defectfusion.evaluation.metrics import precision_recall
from defectfusion.report import PHASE1_COLOR, figure
from defectfusion.report.figures import Ctx, cls, new_figure, num, variant_color


@figure(
    reads=lambda L: [L.split("test"), *L.test_predictions()],
    caption="Precision-recall curves per class on the test split.",
)
def pr_curves(ctx: Ctx) -> Figure:
    gt = load_json(ctx.layout.split("test"))
    v, s = ctx.layout.adopted
    models = [
        (
            "Fase 1",
            ctx.phase1_label(),
            PHASE1_COLOR,
            ctx.layout.phase1(ctx.layout.main, "test_metrics.predictions.json"),
        ),
        (
            "Fase 2",
            ctx.phase2_label(),
            variant_color(ctx.layout, v),
            ctx.layout.phase2(v, s, "test_metrics.predictions.json"),
        ),
    ]
    crit = ctx.critical_ids
    ious = ((0.5, "-"), (0.75, "--"))
    fig, axes = new_figure(1, max(1, len(crit)), 2.4, sharey=True)
    fig.get_layout_engine().set(w_pad=0.06, wspace=0.06)  # the panels' tick labels apart
    ap_text: dict[int, list[str]] = {c: [] for c in crit}
    # Phase 1 wide and underneath, Phase 2 narrow on top: where the two curves coincide (most
    # of them do), Phase 1 shows as a dark edge instead of vanishing under Phase 2.
    widths = [(2.8, 2), (1.1, 3)]
    for (short, _, color, path), (lw, z) in zip(models, widths, strict=False):
        results = load_json(path)
        precision, params = precision_recall(gt, results) if results else (None, None)
        for ax, c in zip(axes[0], crit, strict=False):
            if precision is None:
                ap_text[c].append(f"{short}: sin detecciones")
                continue
            k = list(params.catIds).index(c)
            aps = []
            for t, ls in ious:
                curve = precision[int(np.argmin(np.abs(params.iouThrs - t))), :, k]
                ax.plot(params.recThrs, curve, color=color, ls=ls, lw=lw, zorder=z)
                aps.append(num(np.nanmean(curve)) if np.isfinite(curve).any() else "n/d")
            ap_text[c].append(f"{short}: AP50 {aps[0]}, AP75 {aps[1]}")
    for ax, c in zip(axes[0], crit, strict=False):
        n = sum(1 for a in gt["annotations"] if a["category_id"] == c)
        # The APs go above the panel, never over the curves.
        ax.set_title(f"{cls(ctx.classes[c])} ({n} cajas)\n" + "\n".join(ap_text[c]))
        ax.set_xlabel("recall")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        # Labels at 0, 0.5 and 1 only (the quarters keep their grid lines): «1.00» at the right
        # end of a panel touched the next panel's «0.00».
        ax.set_xticks([0.0, 0.5, 1.0], ["0", "0.5", "1"])
        ax.set_xticks([0.25, 0.75], minor=True)
        ax.grid(which="minor", axis="x", alpha=0.3, lw=0.5)
    axes[0, 0].set_ylabel("precisión (interpolada)")
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=color, lw=lw, label=label)
        for (_, label, color, _), (lw, _) in zip(models, widths, strict=False)
    ]
    handles += [Line2D([], [], color="grey", ls=ls, label=f"IoU {t:.2f}") for t, ls in ious]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles))
    return fig
