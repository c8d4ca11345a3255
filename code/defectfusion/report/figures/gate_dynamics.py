"""Figure ``gate_dynamics``: (a) alpha - alpha0, (b) tau, (c) ||W_proj|| - ||W_proj||0 at each
Phase 2 training step, per variant and seed.

Most variants leave the gate's dynamics alone, so their curves coincide: each variant has its
own colour, dash and (open) marker, and its markers sit at its own steps (staggered by
variant), so a bundle of coinciding curves still shows every variant in it. The initial
values most variants share head the legend; a variant that starts elsewhere says so.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from defectfusion.report import figure, variant_name_es
from defectfusion.report import summary as S
from defectfusion.report.figures import (
    Ctx,
    new_figure,
    num,
    say,
    variant_color,
    variant_dash,
    variant_marker,
)

LEGEND_PT = 9  # a pt above the style's 8: the legend is what tells nine variants apart


def _starts(a0: float | None, w0: float | None) -> str:
    return f"α₀ {num(a0, '.3g')}, ‖W‖₀ {num(w0, '.3g')}"


@figure(
    reads=lambda L: [*L.all_phase2("history.jsonl"), *L.all_phase2("steps.jsonl")],
    caption="The fusion gate alpha and temperature tau per step.",
)
def gate_dynamics(ctx: Ctx, marks: int = 3) -> Figure:
    """Changes since initialisation for alpha and ||W_proj||: naive starts at alpha = 0.1 and
    a 100x larger W_proj, which would flatten zero-start's curves on a shared absolute axis.
    The initial values (the epoch-0 row, step 0) are in the legend. `marks` markers per curve,
    each variant's `1/len(variants)` of a period further along than the one before."""
    fig, axes = new_figure(1, 3, 3.4)  # the legend below takes a third of it
    panels = [
        ("alpha", "(a) α − α₀ (compuerta)", True),
        ("tau", "(b) τ (temperatura)", False),
        (
            "w_proj_norm",
            r"(c) $\Vert W_{\mathrm{proj}}\Vert - \Vert W_{\mathrm{proj}}\Vert_0$",
            True,
        ),
    ]
    variants = ctx.layout.variants
    starts = {}
    for v in variants:
        first = S.read_jsonl(ctx.layout.phase2(v, ctx.layout.seeds[0], "history.jsonl"))
        row = S.epoch_row(first, 0) or {}
        a0, w0 = row.get("alpha"), row.get("w_proj_norm")
        starts[v] = None if a0 is None or w0 is None else _starts(a0, w0)
    common = Counter(t for t in starts.values() if t).most_common(1)
    common_start = common[0][0] if common and common[0][1] > 1 else None
    for i, v in enumerate(variants):
        for k, s in enumerate(ctx.layout.seeds):
            start = S.epoch_row(S.read_jsonl(ctx.layout.phase2(v, s, "history.jsonl")), 0) or {}
            steps = [{"step": 0, **start}, *S.read_jsonl(ctx.layout.phase2(v, s, "steps.jsonl"))]
            label = None
            if k == 0:
                own = starts[v] if starts[v] != common_start else None
                label = variant_name_es(v) + (f" ({own})" if own else "")
            for ax, (key, _, relative) in zip(axes[0], panels, strict=True):
                pts = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
                if not pts:
                    continue
                x, y = (np.asarray(t, dtype=float) for t in zip(*pts, strict=True))
                period = max(1, len(x) // marks)
                ax.plot(
                    x,
                    y - y[0] if relative else y,
                    color=variant_color(ctx.layout, v),
                    ls=variant_dash(ctx.layout, v),
                    label=label,
                    lw=1.1,
                    marker=variant_marker(ctx.layout, v),
                    markevery=(int(period * (i + 0.5) / len(variants)), period),
                    ms=4,
                    markerfacecolor="white",
                    markeredgewidth=1.0,
                )
    for ax, (_, title, relative) in zip(axes[0], panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("paso de entrenamiento")
        # Step counts reach hundreds: few ticks, so their labels stay apart.
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)
        if relative:
            ax.axhline(0, color="grey", lw=0.6, zorder=0)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if not handles:
        say(axes[0, 1], "la Fase 2 no registró ningún paso de entrenamiento")
    else:
        title = common_start and f"Valores iniciales: {common_start}, salvo donde se indica"
        fig.legend(handles, labels, loc="outside lower center", ncol=min(2, len(labels)),
                   columnspacing=1.2, handlelength=2.6, fontsize=LEGEND_PT, title=title,
                   title_fontsize=LEGEND_PT)  # fmt: skip
    return fig
