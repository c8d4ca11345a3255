"""The post-mortem's figures (issue 13): its forest plot and its drift by epoch.

=====================  =====================================================================
``postmortem_forest``  forest plot of the hypotheses (results/postmortem.json): per variant,
                       the mAP difference with its 95 % interval (hierarchical bootstrap over
                       Phase 2 seeds and images) (a) at epoch 1 on val against Phase 1, beside
                       the thesis's epoch-1 change as a reference line, (b) the val-selected
                       checkpoint on test against Phase 1, (c) at epoch 1 on val against the
                       adopted zero-start; a filled marker when the interval excludes 0
``postmortem_mechanism`` the epoch-1 drift taken apart, per variant: (a) the shift before any
                       update (epoch 0 minus Phase 1) and the first epoch's adaptation (epoch
                       1 minus epoch 0), 95 % intervals; (b) the dose-response of the input
                       mismatch (the variants that only change data.normalize or
                       data.image_size, ordered by how far their input lies from Phase 1's),
                       epoch-0 shift and epoch-1 drift (the rule's adjusted interval), its axis
                       fitted to them, beside the thesis's epoch-1 change (its value in the
                       title when it would flatten the data)
``postmortem_drift``   val mAP by epoch minus Phase 1's (its best epoch, the checkpoint Phase 2
                       starts from: the drift as the text defines it, so a switch that moves
                       the model before any update shows at epoch 0), one panel per variant:
                       mean over seeds with a min-max band, the adopted variant's mean in grey
                       beside it, and the thesis's epoch-1 change (a cross; its value in the
                       title when it would flatten the data)
=====================  =====================================================================

Each function takes the figures' context and returns a matplotlib Figure; the package
applies the style and saves it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from defectfusion.config import NORMALIZATIONS
from defectfusion.core.errors import UserError
from defectfusion.core.jsonio import load_json
from defectfusion.report import (
    PHASE1_COLOR,
    THESIS_FIGURES,
    Layout,
    figure,
    model_color,
    variant_name_es,
)
from defectfusion.report.figures import WIDTH, num
from defectfusion.report.summary import best_row, read_jsonl

GREY = "#777777"


def _postmortem(layout: Layout) -> dict[str, Any]:
    pm = load_json(layout.postmortem)
    missing = [v for v in layout.variants if v not in pm.get("phase2", {})]
    if missing:
        raise UserError(
            f"{layout.postmortem}: no results for variant(s) {', '.join(missing)}; "
            "rerun `defectfusion postmortem`"
        )
    return pm


def _thesis_in_view(lo: float, hi: float, thesis: float) -> bool:
    """Whether the thesis's epoch-1 change fits on an axis spanning the data's [lo, hi] (and
    0) without flattening it: it lies within four times the data's span (at least 0.005)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    return abs(thesis) <= 4 * max(hi - lo, 0.005)


def _padded(lo: float, hi: float) -> tuple[float, float]:
    """[lo, hi] with a margin: 8 % of the span, and at least 0.02 in all."""
    pad = max(0.01 - (hi - lo) / 2, 0.0) + 0.08 * (hi - lo)
    return lo - pad, hi + pad


def _interval(
    ax: Any, at: float, d: dict[str, Any] | None, color: str, vertical: bool = False
) -> None:
    """One row of a forest plot (a column with `vertical`): the difference and its interval at
    `at`; hollow when the interval contains 0."""
    if not d or d.get("diff") is None:
        return
    lo, hi = d["ci"]

    def xy(values: list[float], pos: list[float]) -> tuple[list[float], list[float]]:
        return (pos, values) if vertical else (values, pos)

    if lo is not None:
        ax.plot(*xy([lo, hi], [at, at]), color=color, lw=1.6, solid_capstyle="butt")
    excludes = lo is not None and (hi < 0 or lo > 0)
    ax.plot(
        *xy([d["diff"]], [at]), marker="o", ms=5, color=color,
        markerfacecolor=color if excludes else "white", markeredgewidth=1.3, ls="none",
    )  # fmt: skip


@figure(
    reads=lambda L: [L.postmortem],
    caption=(
        "Each hypothesis's epoch-1 drift with its adjusted interval, against the thesis's drop "
        "and the equivalence margin."
    ),
)
def postmortem_forest(ctx: Any) -> Figure:
    layout: Layout = ctx.layout
    pm = _postmortem(layout)
    variants = list(layout.variants)
    adopted = pm["adopted"]
    thesis = pm["thesis"]["drop"]
    fig = Figure(figsize=(WIDTH, 0.9 + 0.28 * len(variants)), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True, squeeze=False)[0]
    ys = np.arange(len(variants))[::-1]  # the first variant on top
    panels = [
        ("(a) época 1, val.\n− Fase 1", "epoch1", "val", "phase1"),
        ("(b) mejor época, prueba\n− Fase 1", "best", "test", "phase1"),
        (f"(c) época 1, val.\n− «{variant_name_es(adopted).lower()}»",
         "epoch1", "val", "adopted"),
    ]  # fmt: skip
    for ax, (title, which, split, against) in zip(axes, panels, strict=True):
        for y, v in zip(ys, variants, strict=True):
            color = model_color(v, order=variants)
            vd = pm["phase2"][v]["verdict"]
            if against == "phase1" and which == "epoch1":  # the rule's adjusted interval
                d = {"diff": vd["diff"], "ci": vd["ci_adjusted"]}
            elif against == "phase1":
                d = pm["phase2"][v]["drift"][which][split]["map"]
            elif vd.get("vs_adopted"):
                d = {"diff": vd["vs_adopted"]["diff"], "ci": vd["vs_adopted"]["ci_adjusted"]}
            else:
                d = next(
                    (
                        c for c in pm["contrasts"]
                        if (c["a"], c["b"], c["metric"], c["split"], c["which"])
                        == (adopted, v, "map", split, which)
                    ),
                    None,
                )  # fmt: skip
            _interval(ax, y, d, color)
        ax.axvline(0.0, color=PHASE1_COLOR, lw=0.8, zorder=0)
        if which == "epoch1" and against == "phase1":
            ax.axvline(thesis, color=GREY, ls=(0, (4, 2)), lw=1.0, zorder=0)
            ax.annotate(
                f" tesis: {num(thesis, '.3f')}", xy=(thesis, 0.02), xycoords=("data", "axes fraction"),
                ha="left", va="bottom", fontsize=8, color=GREY,
            )  # fmt: skip
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("Δ mAP@[.50:.95]")
        ax.grid(axis="y", visible=False)
        ax.xaxis.set_major_locator(MaxNLocator(3))
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)  # U+2212 minus, decimal point
    axes[0].set_yticks(ys, [variant_name_es(v) for v in variants])
    axes[0].set_ylim(-0.7, len(variants) - 0.3)
    n = len(pm["seeds"])
    rule = pm["rule"]
    fig.suptitle(
        f"Intervalos sobre imágenes y {n} semilla{'s' if n != 1 else ''} de la Fase 2;\n(a) y (c) "
        f"ajustados por {rule['n_hypotheses']} hipótesis (cada uno al "
        f"{num(rule['level_each'], '.2f')} %), (b) al 95 %. Relleno: excluye el 0",
        fontsize=8,
    )
    return fig


# How far each input normalisation puts a pixel from Phase 1's (ImageNet's) normalised value:
# the root mean square over pixel values uniform in [0, 1] and the three channels of
# (x - m) / s - (x - m0) / s0 (the constants of config.NORMALIZATIONS; none: m = 0, s = 1).


def input_dose(switches: dict[str, Any], phase1_size: int) -> tuple[str, float] | None:
    """A variant's input mismatch: ("normalize", RMS shift of the normalised pixels) or
    ("image_size", |log2(size / Phase 1's)|); None when it switches anything else."""
    if set(switches) == {"data.normalize"} and switches["data.normalize"] in NORMALIZATIONS:
        (m, s), (m0, s0) = NORMALIZATIONS[switches["data.normalize"]], NORMALIZATIONS["imagenet"]
        x = np.linspace(0.0, 1.0, 101)
        d = [(x - a) / b - (x - a0) / b0 for a, b, a0, b0 in zip(m, s, m0, s0, strict=True)]
        return "normalize", float(np.sqrt(np.mean(np.square(d))))
    if set(switches) == {"data.image_size"}:
        return "image_size", abs(float(np.log2(switches["data.image_size"] / phase1_size)))
    return None


@figure(
    reads=lambda L: [L.postmortem],
    caption=(
        "The drift split into its epoch-0 shift (before any update) and its epoch-1 adaptation, "
        "per hypothesis; the input mismatch's dose-response on an axis fitted to its points."
    ),
)
def postmortem_mechanism(ctx: Any) -> Figure:
    layout: Layout = ctx.layout
    pm = _postmortem(layout)
    variants = list(layout.variants)
    thesis = pm["thesis"]["drop"]
    fig = Figure(figsize=(WIDTH, 1.2 + 0.26 * len(variants)), layout="constrained")
    ax_a, ax_b = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1]})
    ys = np.arange(len(variants))[::-1]
    for y, v in zip(ys, variants, strict=True):
        mech = pm["phase2"][v]["mechanism"]
        _interval(ax_a, y + 0.15, mech["shift_epoch0"], "#4c72b0")
        _interval(ax_a, y - 0.15, mech["adaptation_epoch1"], "#dd8452")
    ax_a.axvline(0.0, color=PHASE1_COLOR, lw=0.8, zorder=0)
    ax_a.set_yticks(ys, [variant_name_es(v) for v in variants])
    ax_a.set_ylim(-0.7, len(variants) - 0.3)
    ax_a.set_xlabel("Δ mAP val.")
    ax_a.set_title("(a) azul: época 0 − Fase 1;\nnaranja: época 1 − época 0", fontsize=8)
    ax_a.xaxis.set_major_locator(MaxNLocator(4))
    ax_a.ticklabel_format(axis="x", style="plain", useOffset=False)
    switches = ctx.values["pipeline"].get("variant_switches") or {}
    size = int(ctx.values["data"]["image_size"])
    doses = []
    for v in variants:
        dose = (
            ("adopted", 0.0) if v == pm["adopted"] else input_dose(switches.get(v, {"x": 0}), size)
        )
        if dose is not None:
            doses.append((v, dose[1]))
    title_b = "(b) dosis del desajuste de la entrada;\nazul: época 0; rojo: época 1 (IC ajustado)"
    if len(doses) > 1:
        doses.sort(key=lambda vd: vd[1])
        xs = np.arange(len(doses))
        shown: list[float] = [0.0]  # every value drawn (differences and interval ends)
        for x, (v, _) in zip(xs, doses, strict=True):
            vd = pm["phase2"][v]["verdict"]
            shift = pm["phase2"][v]["mechanism"]["shift_epoch0"]
            drift = {"diff": vd["diff"], "ci": vd["ci_adjusted"]}
            _interval(ax_b, x - 0.12, shift, "#4c72b0", vertical=True)
            _interval(ax_b, x + 0.12, drift, "#c44e52", True)
            for d in (shift, drift):
                shown += [t for t in (d or {}).get("ci") or [] if t is not None]
                shown += [d["diff"]] if d and d.get("diff") is not None else []
        # The axis fits the points (a few hundredths): the thesis's drop, a tenth, would leave
        # them a sliver of the panel; then its value goes in the title.
        lo, hi = min(shown), max(shown)
        if _thesis_in_view(lo, hi, thesis):
            lo, hi = min(lo, thesis), max(hi, thesis)
            ax_b.axhline(thesis, color=GREY, ls=(0, (4, 2)), lw=1.0)
            ax_b.annotate(f"tesis: {num(thesis, '.3f')}", xy=(0.02, thesis), xycoords=("axes fraction", "data"),
                          va="bottom", fontsize=8, color=GREY)  # fmt: skip
        else:
            title_b += f"\ntesis: {num(thesis, '.3f')}, fuera de escala"
        ax_b.set_ylim(*_padded(lo, hi))
        ax_b.set_xlim(-0.5, len(doses) - 0.5)
        ax_b.axhline(0.0, color=PHASE1_COLOR, lw=0.8, zorder=0)
        ax_b.set_xticks(xs, [variant_name_es(v) for v, _ in doses], rotation=30, ha="right")
        ax_b.set_ylabel("Δ mAP val. (− Fase 1)")
        ax_b.yaxis.set_major_locator(MaxNLocator(5))
        ax_b.ticklabel_format(axis="y", style="plain", useOffset=False)
    else:
        ax_b.set_axis_off()
        ax_b.text(0.5, 0.5, "sin variantes de dosis en esta ejecución\n(perfil configs/mechanism.yaml)",
                  ha="center", va="center", fontsize=8, transform=ax_b.transAxes)  # fmt: skip
    ax_b.set_title(title_b, fontsize=8)
    fig.suptitle("Relleno: el intervalo excluye el 0", fontsize=8)
    return fig


def _deltas(layout: Layout, variant: str, phase1: float) -> tuple[list[int], np.ndarray]:
    """Epochs and ``[seeds, epochs]`` val mAP minus Phase 1's `phase1` (NaN where a seed
    stopped)."""

    rows = [read_jsonl(layout.phase2(variant, s, "history.jsonl")) for s in layout.seeds]
    epochs = sorted({int(r["epoch"]) for h in rows for r in h if r.get("val_map") is not None})
    out = np.full((len(rows), len(epochs)), np.nan)
    for i, h in enumerate(rows):
        by = {int(r["epoch"]): r["val_map"] for r in h if r.get("val_map") is not None}
        if 0 not in by:
            where = layout.phase2(variant, layout.seeds[i], "history.jsonl")
            raise UserError(f"{where}: no epoch-0 val_map (the evaluation before any update)")
        for j, e in enumerate(epochs):
            if e in by:
                out[i, j] = by[e] - phase1
    return epochs, out


@figure(
    reads=lambda L: [
        *L.all_phase2("history.jsonl"),
        L.phase1(L.main, "history.jsonl"),
        THESIS_FIGURES,
    ],
    caption="Validation mAP change from Phase 1 per epoch and variant, beside the thesis's drop.",
)
def postmortem_drift(ctx: Any) -> Figure:
    layout: Layout = ctx.layout
    variants = list(layout.variants)
    adopted = layout.adopted[0]
    thesis = _thesis_drop(layout)

    p1_history = layout.phase1(layout.main, "history.jsonl")
    phase1 = float(best_row(read_jsonl(p1_history), p1_history)["val_map"])
    data = {v: _deltas(layout, v, phase1) for v in variants}
    cols = min(4, len(variants))
    rows = -(-len(variants) // cols)
    fig = Figure(figsize=(WIDTH, 0.5 + 1.7 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    lows = [np.nanmin(d) for _, d in data.values() if np.isfinite(d).any()]
    highs = [np.nanmax(d) for _, d in data.values() if np.isfinite(d).any()]
    lo, hi = min([0.0, *lows]), max([0.0, *highs])
    # The thesis's epoch-1 point on the same scale, unless it would flatten the data (then
    # the title gives its value).
    show_thesis = _thesis_in_view(lo, hi, thesis)
    if show_thesis:
        lo, hi = min(lo, thesis), max(hi, thesis)
    lo, hi = _padded(lo, hi)
    for k, ax in enumerate(axes.flat):
        if k >= len(variants):
            ax.set_visible(False)
            continue
        v = variants[k]
        epochs, d = data[v]
        color = model_color(v, order=variants)
        if v != adopted and adopted in data:
            ea, da = data[adopted]
            ax.plot(ea, np.nanmean(da, axis=0), color=GREY, ls="--", lw=1.0)
        ax.plot(epochs, np.nanmean(d, axis=0), color=color, marker="o", ms=2.5)
        if d.shape[0] > 1:
            ax.fill_between(
                epochs, np.nanmin(d, axis=0), np.nanmax(d, axis=0), color=color, alpha=0.2, lw=0
            )
        ax.axhline(0.0, color=PHASE1_COLOR, lw=0.7, zorder=0)
        if show_thesis:
            ax.plot([1], [thesis], marker="x", ms=6, color=PHASE1_COLOR, ls="none")
        ax.set_title(textwrap.fill(variant_name_es(v), 20), fontsize=8)  # long names wrap
        ax.set_ylim(lo, hi)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    for k, ax in enumerate(axes.flat[: len(variants)]):
        if k + cols >= len(variants):  # the lowest panel of its column: its own epoch axis
            ax.tick_params(labelbottom=True)
            ax.set_xlabel("época")
    for ax in axes[:, 0]:
        ax.set_ylabel("Δ mAP val. (− Fase 1)")
    n = len(layout.seeds)
    band = f"; banda: mínimo y máximo de {n} semillas" if n > 1 else ""
    where = "×" if show_thesis else f"fuera de escala, {num(thesis, '.3f')}"
    fig.suptitle(
        textwrap.fill(
            f"Cambio respecto de la Fase 1 (época 0: antes de actualizar). Media de las "
            f"semillas{band}; discontinua gris: «{variant_name_es(adopted).lower()}»; la tesis "
            f"en la época 1: {where}",
            100,  # at 8 pt, a line of the column's width
        ),
        fontsize=8,
    )
    return fig


def _thesis_drop(layout: Layout) -> float:
    from defectfusion.analysis.postmortem import thesis_drop  # deferred: loads scipy

    return float(thesis_drop(Path(THESIS_FIGURES))["drop"])
