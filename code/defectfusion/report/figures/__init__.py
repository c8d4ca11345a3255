"""The thesis's figures, as PNG (200 dpi) and PDF, from the results files: one module per
figure (or per small family), each declared beside its code with ``report.figure`` (its
name, its module, the results files it reads and its caption), so the Snakefile gives each
figure exactly its own code as input: editing ``confusion.py`` redraws the confusion figure
and nothing else.

This package holds what the figures share: one style (a 6.3-inch text width, 7-9 pt type,
matplotlib's object API, headless), the helpers, the colours (one per model in every figure,
from ``report.MODEL_COLORS``), and `write_figures`, which draws, saves and records each one.
Every label is in Spanish, like the book; numbers in a figure's text use the book's
conventions (decimal point, U+2212 minus).

"Phase 1" is the main preset's val-selected checkpoint; "Phase 2" the adopted variant
(zero-start) from the first seed, its val-selected checkpoint (``Layout.adopted``), except in
figure ``qualitative``, which pools its cases over every seed. Where several seeds ran,
curves show their mean and a min-max band.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless, whatever MPLBACKEND says

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image

from defectfusion.core.errors import UserError
from defectfusion.core.fsutil import atomic_write
from defectfusion.core.jsonio import load_json
from defectfusion.data.coco import category_names, images_dir
from defectfusion.report import (
    PARAM_SECTIONS,
    PHASE1_COLOR,
    Layout,
    backbone_name_es,
    chosen,
    class_name_es,
    inputs_of,
    model_color,
    names,
    number_es,
    output,
    variant_name_es,
)
from defectfusion.report import provenance as prov
from defectfusion.report import summary as S

WIDTH = 6.3  # inches: a thesis text width
COLUMN_IN = (210 - 2 * 20) / 25.4  # the PDF's text width (report/book.py: A4, 20 mm margins)
MIN_PRINT_PT = 8.0  # the smallest text allowed at that width
STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    # 8 pt is the smallest text a printed page reads comfortably: every text of a figure
    # is at least that at the PDF's column width (`smallest_text_pt` measures it)
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "figure.titlesize": 9,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.4,
    "lines.markersize": 3.5,
    "pdf.fonttype": 42,  # TrueType: text stays text in the PDF
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.03,
}
# Colours: one per model in every figure, from report/__init__.py (MODEL_COLORS: Okabe-Ito,
# distinguishable with colour-blindness; in greyscale print the line styles tell them apart).
DASHES = ["-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1))]
# With nine Phase 2 variants, colours and six dashes repeat or look alike (vermillion, orange
# and olive): each variant also has its own marker, so every curve is told apart by shape.
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h"]
# Boxes drawn on metal: saturated hues that stand out on grey.
CLASS_COLORS = ["#1f77b4", "#ff7f0e", "#e41a1c", "#ffd700", "#17becf", "#e377c2", "#2ca02c"]


def variant_color(layout: Layout, variant: str) -> str:
    return model_color(variant, order=layout.variants)


# A number in a figure's text as in the book (and the summary's sentences): one function.
num = number_es


def cls(name: str) -> str:
    return class_name_es(name)


def variant_dash(layout: Layout, variant: str) -> Any:
    return DASHES[layout.variants.index(variant) % len(DASHES)]


def variant_marker(layout: Layout, variant: str) -> str:
    return MARKERS[layout.variants.index(variant) % len(MARKERS)]


@dataclass
class Ctx:
    values: dict[str, Any]
    layout: Layout

    @cached_property
    def classes(self) -> list[str]:
        return category_names(load_json(self.layout.split("test")))

    @cached_property
    def critical_ids(self) -> list[int]:
        S.critical_names(self.classes, self.values["data"]["critical_classes"], "config")
        return list(self.values["data"]["critical_classes"])

    @property
    def critical(self) -> list[str]:
        return [self.classes[i] for i in self.critical_ids]

    @property
    def score_threshold(self) -> float:
        return float(self.values["eval"]["score_threshold"])

    def phase1_label(self) -> str:
        return f"Fase 1 ({preset_label(self, self.layout.main)})"

    def phase2_label(self) -> str:
        v, s = self.layout.adopted
        seed = f", semilla {s}" if len(self.layout.seeds) > 1 else ""
        return f"Fase 2 ({variant_name_es(v).lower()}{seed})"


def preset_label(ctx: Ctx, preset: str, main: str | None = None) -> str:
    return backbone_name_es(preset, ctx.values, main)


def new_figure(
    rows: int, cols: int, height: float, width: float = WIDTH, **kw: Any
) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def no_ticks(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)


def say(ax: Any, text: str) -> None:
    """A panel that only holds a sentence (nothing to draw)."""
    no_ticks(ax)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)


def load_image(ctx: Ctx, file_name: str) -> np.ndarray:
    path = images_dir(ctx.layout.data_dir) / file_name
    if not path.is_file():
        raise UserError(f"{path}: image not found")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def draw_box(ax: Any, bbox: Sequence[float], color: str, lw: float = 1.4, ls: Any = "-") -> None:
    x, y, w, h = bbox
    ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=color, linewidth=lw, linestyle=ls))


def epochs_plot(
    ax: Any,
    histories: list[list[dict[str, Any]]],
    key: str,
    color: str,
    label: str,
    ls: Any = "-",
    lw: float | None = None,
    spread: str = "band",
    dodge: float = 0.0,
    marker: str = "o",
    shift: float = 0.0,
    hollow: bool = False,
) -> None:
    """Mean over seeds of `key` per epoch and, when there are several seeds, their min-max
    spread: a band (`spread` "band": one series to a panel), vertical bars shifted by `dodge`
    epochs ("bars": a few series whose bands would cover each other) or none ("none": many
    series in one panel, their spreads drawn elsewhere). `shift` moves the whole series
    sideways by that many epochs and `hollow` draws its markers open: many series of
    near-equal values stay apart, and a marker under another still shows its outline."""
    epochs = sorted({r["epoch"] for h in histories for r in h if r.get(key) is not None})
    if not epochs:
        return
    vals = [
        [r[key] for h in histories for r in h if r["epoch"] == e and r.get(key) is not None]
        for e in epochs
    ]
    means = [float(np.mean(v)) for v in vals]
    shown = marker if len(epochs) <= 25 else None  # markers clutter long runs
    x_mean = [e + shift for e in epochs]
    face = {"markerfacecolor": "white", "markeredgewidth": 1.0} if hollow else {}
    ax.plot(x_mean, means, color=color, ls=ls, lw=lw, marker=shown, label=label, **face)
    if len(histories) < 2 or spread == "none":
        return
    low, high = [min(v) for v in vals], [max(v) for v in vals]
    if spread == "bars":
        below = [m - lo for m, lo in zip(means, low, strict=True)]
        above = [hi - m for m, hi in zip(means, high, strict=True)]
        x = [e + shift + dodge for e in epochs]
        ax.errorbar(x, means, yerr=[below, above], fmt="none", ecolor=color, elinewidth=1.0,
                    capsize=2.5, alpha=0.9)  # fmt: skip
    else:
        ax.fill_between(x_mean, low, high, color=color, alpha=0.15, lw=0)


def epoch_axis(ax: Any, ylabel: str) -> None:
    ax.set_xlabel("época")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def phase2_histories(ctx: Ctx, variant: str) -> list[list[dict[str, Any]]]:
    return [S.read_jsonl(ctx.layout.phase2(variant, s, "history.jsonl")) for s in ctx.layout.seeds]


def phase1_best(ctx: Ctx) -> dict[str, Any]:
    path = ctx.layout.phase1(ctx.layout.main, "history.jsonl")
    return S.best_row(S.read_jsonl(path), path)


def reference_line(ax: Any, value: float | None, label: str) -> None:
    """Phase 1's level, drawn over the curves: beneath them, curves at that level hid it."""
    if value is not None:
        ax.axhline(value, color=PHASE1_COLOR, ls=(0, (5, 3)), lw=1.2, label=label, zorder=5)


def min_span(ax: Any, span: float = 0.1) -> None:
    """At least `span` on the y axis: a difference of a few thousandths must not fill a panel
    (the curves carry no interval; the test differences with theirs are in the tables)."""
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        mid = (lo + hi) / 2
        lo, hi = max(0.0, mid - span / 2), mid + span / 2
        ax.set_ylim(lo, max(hi, lo + span))


def models_compared(ctx: Ctx) -> list[tuple[str, dict[str, Any]]]:
    v, s = ctx.layout.adopted
    return [
        (ctx.phase1_label(), load_json(ctx.layout.phase1(ctx.layout.main, "test_metrics.json"))),
        (ctx.phase2_label(), load_json(ctx.layout.phase2(v, s, "test_metrics.json"))),
    ]


def _renderer(fig: Figure) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    return canvas.get_renderer()


def fit_to_column(fig: Figure, tries: int = 3) -> None:
    """Narrow a figure whose tight box (what savefig keeps: legends and labels outside the
    axes included) is wider than the PDF's column, so the book prints it at full size and
    its text keeps its points; the axes give up the width (the layout is constrained)."""
    for _ in range(tries):
        fig.draw_without_rendering()
        tight = fig.get_tightbbox(_renderer(fig)).width
        if tight <= COLUMN_IN * 1.001:
            return
        w, h = fig.get_size_inches()
        fig.set_size_inches(w - (tight - COLUMN_IN) - 0.02, h)


def smallest_text_pt(fig: Figure) -> float | None:
    """The figure's smallest visible text, in points, as printed at the book's column width:
    the book scales a figure wider than the column (legends outside the axes widen its tight
    box) down to it, and every font with it. None: no text."""
    from matplotlib.text import Text

    fig.draw_without_rendering()
    renderer = _renderer(fig)
    width = fig.get_tightbbox(renderer).width  # inches, as savefig's bbox "tight" crops
    sizes = [
        t.get_fontsize()
        for t in fig.findobj(Text)
        if t.get_visible() and t.get_text().strip() and t.get_window_extent(renderer).width > 0
    ]
    if not sizes:
        return None
    return round(min(sizes) * min(1.0, COLUMN_IN / width), 2)


def save(fig: Figure, out: Path, name: str, record: dict[str, Any]) -> list[Path]:
    """PNG and PDF, each with the provenance record in its metadata; no timestamp."""
    line = prov.one_line(record)
    png_meta = {"Title": name, "Provenance": line}
    pdf_meta = {
        "Title": name,
        "Subject": line,
        "Keywords": prov.keywords(record),
        "Creator": "defectfusion report",
        "CreationDate": None,
    }
    return [
        atomic_write(
            out / f"{name}.png", lambda t: fig.savefig(t, format="png", metadata=png_meta)
        ),
        atomic_write(
            out / f"{name}.pdf", lambda t: fig.savefig(t, format="pdf", metadata=pdf_meta)
        ),
    ]


def figure_styles(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``figure_style`` of the config, checked: known figures, real matplotlib rcParams.

    Per figure, so that restyling one figure redraws only that one (Snakemake's params).
    """
    styles = values.get("figure_style") or {}
    for name, style in styles.items():
        if name not in names("figures"):
            raise UserError(
                f"figure_style.{name}: no such figure; figures are {list(names('figures'))}"
            )
        if not isinstance(style, dict):
            raise UserError(f"figure_style.{name}: expected a mapping of rcParams, got {style!r}")
        for key in style:
            if key not in matplotlib.rcParams:
                raise UserError(f"figure_style.{name}: {key!r} is not a matplotlib rcParam")
            try:
                matplotlib.rcParams.validate[key](style[key])
            except (ValueError, TypeError) as e:
                raise UserError(f"figure_style.{name}.{key}: {e}") from None
    return styles


def draw_function(name: str) -> Callable[[Ctx], Figure]:
    """The function that draws figure `name`: the one its `figure` declaration names (its
    module imported only when drawn)."""
    module = importlib.import_module(output("figures", name).module)
    return getattr(module, name)


def write_figures(
    values: dict[str, Any],
    out: str | Path,
    only: Sequence[str] | None = None,
    rule: str = "manual",
    results: str = "results",
) -> list[Path]:
    """Draw figures `only` (default: all) as ``out/NAME.{png,pdf}`` and their sidecars."""
    names, layout = chosen(values, only, "figures", results)
    ctx = Ctx(values, layout)
    params = prov.params_subset(values, PARAM_SECTIONS)
    styles = figure_styles(values)
    written: list[Path] = []
    for name in names:
        style = styles.get(name, {})
        fig_params = {**params, "figure_style": {name: style}} if style else params
        record = prov.make_record(
            f"figures/{name}", rule, fig_params, inputs_of(layout, "figures", name)
        )
        with matplotlib.rc_context({**STYLE, **style}):
            fig = draw_function(name)(ctx)
            fit_to_column(fig)
            # what a printed page shows (the book's tests hold it to MIN_PRINT_PT)
            record["smallest_text_pt"] = smallest_text_pt(fig)
            paths = save(fig, Path(out), name, record)
        prov.write_sidecar(results, record, paths)
        written += paths
    return written
