"""Figure ``prompt_similarity``: cosine similarity between the class-prompt embeddings."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from defectfusion.core.jsonio import load_json
from defectfusion.report import figure, text_encoder_es
from defectfusion.report.figures import Ctx, cls, new_figure, num


@figure(
    reads=lambda L: [L.text],
    caption="Cosine similarity of the class prompts' text embeddings.",
)
def prompt_similarity(ctx: Ctx) -> Figure:
    data = load_json(ctx.layout.text)
    cos = np.asarray(data["cosine"], dtype=float)
    names = [cls(n) for n in data["class_names"]]
    fig, axes = new_figure(1, 1, 3.6, width=4.6)
    ax = axes[0, 0]
    # The colours span the off-diagonal range (the diagonal is 1 by definition, greyed), so
    # the pairs the text can hardly tell apart stand out.
    diag = np.eye(len(names), dtype=bool)
    off = cos[~diag]
    lo, hi = (float(off.min()), float(off.max())) if off.size else (0.0, 1.0)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_where(diag, cos), cmap=cmap, vmin=lo, vmax=max(hi, lo + 1e-6))
    ax.grid(False)
    for i in range(len(names)):
        for j in range(len(names)):
            bright = i != j and (cos[i, j] - lo) / max(1e-9, hi - lo) > 0.6
            ax.text(
                j,
                i,
                num(cos[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="black" if bright or i == j else "white",
            )
    crit = {cls(c) for c in ctx.critical}
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(names)), names)
    for t in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        if t.get_text() in crit:
            t.set_fontweight("bold")
    ax.set_title(
        f"Descripciones de las clases, {text_encoder_es(data.get('encoder', '?'))} "
        f"($D_t$ = {data.get('dim', '?')})"
        "\nclases críticas en negrita",
        fontsize=8,
    )
    fig.colorbar(image, ax=ax, shrink=0.8, label="similitud coseno")
    return fig
