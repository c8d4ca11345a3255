"""Figure ``gate_dynamics``: (a) alpha - alpha0, (b) tau, (c) ||W_proj|| - ||W_proj||0 at each
Phase 2 training step, per variant.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from defectfusion.report import figure, variant_name_es
from defectfusion.report import summary as S
from defectfusion.report.figures import Ctx, new_figure, num, say, variant_color, variant_dash


@figure(
    reads=lambda L: [*L.all_phase2("history.jsonl"), *L.all_phase2("steps.jsonl")],
    caption="The fusion gate alpha and temperature tau per step.",
)
def gate_dynamics(ctx: Ctx) -> Figure:
    """Changes since initialisation for alpha and ||W_proj||: naive starts at alpha = 0.1 and
    a 100x larger W_proj, which would flatten zero-start's curves on a shared absolute axis.
    The initial values (the epoch-0 row, step 0) are in the legend."""
    fig, axes = new_figure(1, 3, 2.5)
    panels = [
        ("alpha", "(a) α − α₀ (compuerta)", True),
        ("tau", "(b) τ (temperatura)", False),
        ("w_proj_norm", r"(c) $\Vert W_{\mathrm{proj}}\Vert - \Vert W_{\mathrm{proj}}\Vert_0$", True),
    ]
    for v in ctx.layout.variants:
        for k, s in enumerate(ctx.layout.seeds):
            start = S.epoch_row(S.read_jsonl(ctx.layout.phase2(v, s, "history.jsonl")), 0) or {}
            steps = [{"step": 0, **start}, *S.read_jsonl(ctx.layout.phase2(v, s, "steps.jsonl"))]
            label = None
            if k == 0:
                a0, w0 = start.get("alpha"), start.get("w_proj_norm")
                name = variant_name_es(v)
                label = (
                    name
                    if a0 is None or w0 is None
                    else f"{name} (α₀ {num(a0, '.3g')}, ‖W‖₀ {num(w0, '.3g')})"
                )
            for ax, (key, _, relative) in zip(axes[0], panels, strict=True):
                pts = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
                if not pts:
                    continue
                x, y = (np.asarray(t, dtype=float) for t in zip(*pts, strict=True))
                ax.plot(
                    x,
                    y - y[0] if relative else y,
                    color=variant_color(ctx.layout, v),
                    ls=variant_dash(ctx.layout, v),
                    label=label,
                    lw=1.2,
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
        fig.legend(handles, labels, loc="outside lower center", ncol=min(2, len(labels)),
                   columnspacing=1.2, handlelength=1.8)  # fmt: skip
    return fig
