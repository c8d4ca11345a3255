"""Tables, figures, provenance and the thesis book, from the files the stages wrote.

The report stage reads results files only, never a checkpoint, and holds no typed number.
`Layout` is where each result lives and which files each table and figure reads: the
Snakefile declares exactly these inputs (``Layout.inputs``), so an output is rebuilt when,
and only when, a file it reads changes. This module stays light (no numpy, no matplotlib):
the Snakefile imports it while parsing.

Every output is declared once: its kind and name, the module that makes it and the results
files it reads; the tables and the summary here, each figure beside its code (`figure`). The
Snakefile (each job's inputs, its code), the provenance records, `write_figures` and the
book's checks all read those declarations (``OUTPUTS``)::

    results/tables/NAME.{csv,md,tex}   TABLES      (defectfusion.report.tables)
    figures/NAME.{png,pdf}             FIGURES     (defectfusion.report.figures.*, one module
                                                    per figure or small family)
    results/summary.json               the book's numbers (defectfusion.report.summary)
    results/provenance/KIND/NAME.json  one provenance record per output (report.provenance)
    results/provenance.json            the index of all records
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from defectfusion.core.errors import UserError
from defectfusion.layout import (  # noqa: F401 (re-exported: the report's names for them)
    ADOPTED_VARIANT,
    DEIMV2_RECIPE,
    PHASE1_PREDICTIONS,
    PHASE2_PREDICTIONS,
    SPLIT_NAMES,
    THESIS_FIGURES,
    Layout,
)
from defectfusion.report.labels import (  # noqa: F401 (re-exported: the report's names)
    BACKBONE_NAMES_ES,
    CLASS_NAMES_ES,
    METRIC_NAMES_ES,
    MODEL_COLORS,
    OKABE_ITO,
    PHASE1_COLOR,
    TEXT_ENCODER_NAMES_ES,
    VARIANT_NAMES_ES,
    backbone_name_es,
    backbone_of,
    class_name_es,
    model_color,
    number_es,
    preset_setting,
    text_encoder_es,
    variant_name_es,
)

KINDS: tuple[str, ...] = ("tables", "figures", "summary")
# The config sections every report output depends on: the Snakefile's rule params, and the
# params hash in each provenance record.
PARAM_SECTIONS: tuple[str, ...] = ("data", "model", "eval", "pipeline")


@dataclass(frozen=True)
class Output:
    """One report output, declared once: what it is, what makes it and what it reads."""

    kind: str  # tables | figures | summary
    name: str
    module: str  # a figure: its module holds a function of the same name; a table: tables.py
    reads: Callable[[Layout], list[str]]  # the results files it reads (Snakemake's inputs)
    optional: Callable[[Layout], list[str]] = lambda layout: []  # read when present
    caption: str = ""  # its line in `snakemake --report` (the book writes its own, Spanish)


_TABLES = "defectfusion.report.tables"
# The tables and the summary; each figure declares itself beside its code (`figure`).
_DECLARED: tuple[Output, ...] = (
    # tables (report/tables.py)
    Output("tables", "dataset", _TABLES, lambda L: L.splits()),
    Output("tables", "phase1", _TABLES, lambda L: L.presets_history_and_test(),
           lambda L: [L.eval_benchmark(p) for p in L.presets]),
    Output("tables", "phase2", _TABLES, lambda L: [
        *L.main_history_and_test(), *L.all_phase2("test_metrics.json"),
        *L.postmortem_if_run(),  # the intervals the book's text quotes
    ]),
    Output("tables", "per_class_recall", _TABLES,
           lambda L: [L.phase1(L.main, "test_metrics.json"), *L.adopted_test()]),
    # the book's appendix and methodology (issue 14)
    Output("tables", "settings", _TABLES,
           lambda L: [L.text, *L.postmortem_if_run(), THESIS_FIGURES, *L.splits()]),
    Output("tables", "recipe", _TABLES, lambda L: [DEIMV2_RECIPE]),
    # the thesis's figures beside this run's, and the prompts (issue 26)
    Output("tables", "thesis_vs_run", _TABLES, lambda L: [
        THESIS_FIGURES, *L.postmortem_if_run(), *L.all_phase2("history.jsonl"),
    ]),
    Output("tables", "prompts", _TABLES, lambda L: [L.text]),
    Output("tables", "significant", _TABLES, lambda L: L.postmortem_if_run()),
    Output("tables", "phase1_detail", _TABLES, lambda L: L.presets_history_and_test(),
           lambda L: [L.eval_benchmark(p) for p in L.presets]),
    Output("tables", "phase2_detail", _TABLES, lambda L: [
        *L.main_history_and_test(), *L.all_phase2("history.jsonl"),
        *L.all_phase2("test_metrics.json"),
        *(L.compare(v, s) for v in L.variants for s in L.seeds),
    ]),
    Output("tables", "runtime", _TABLES, lambda L: [
        *(L.phase1(p, "history.jsonl") for p in L.presets), *L.all_phase2("history.jsonl"),
    ], lambda L: L.stage_benchmarks()),
    Output("tables", "environment", _TABLES, lambda L: ["requirements.lock"]),  # versions
    # the book's numbers (report/summary.py)
    Output("summary", "summary", "defectfusion.report.summary", lambda L: [
        *L.splits(), *L.presets_history_and_test(), *L.all_phase2("history.jsonl"),
        *L.all_phase2("steps.jsonl"), *L.all_phase2("test_metrics.json"),
        L.postmortem,  # every interval (the compare files are per seed)
        *L.qualitative_predictions(),  # the qualitative figure's cases, counted
        L.text,  # the prompts' similarities (figure prompt_similarity), read out
    ], lambda L: L.stage_benchmarks()),  # the run's duration on the clock
)  # fmt: skip


# One line per table: its caption in `snakemake --report` (report/*.rst reads it through the
# rules' `caption` param; a figure's is in its `figure` declaration). The book writes its own
# Spanish captions.
TABLE_CAPTIONS: dict[str, str] = {
    "dataset": "Images, boxes and boxes per class of each split.",
    "phase1": "Phase 1 presets on the test split: mAP, mAP50, critical recall, composite, "
    "parameters, training and evaluation time.",
    "phase2": "Each Phase 2 variant (mean over seeds) on the test split, with its difference "
    "to Phase 1 and that difference's interval.",
    "per_class_recall": "Recall per class, Phase 1 against the adopted Phase 2 variant.",
    "settings": "The run's settings: data, models, schedules, text encoder, decision rule.",
    "recipe": "DEIMv2's official training recipe beside this run's: aligned or different, and "
    "why.",
    "thesis_vs_run": "The thesis's figures beside this run's, with their ratio.",
    "prompts": "The natural-language description of each class the text encoder embedded.",
    "significant": "Every reported difference whose interval, adjusted as the verdict's, "
    "excludes zero.",
    "phase1_detail": "Phase 1 per preset: every metric at the selected epoch, and the plateau.",
    "phase2_detail": "Phase 2 per variant and seed: every metric, and the per-seed comparison "
    "with Phase 1.",
    "runtime": "Wall and CPU time of every training run and pipeline stage.",
    "environment": "The versions of the libraries the run used.",
}


_FIGURES: dict[str, Output] = {}  # filled by `figure` as report/figures/*.py are imported


def figure(
    reads: Callable[[Layout], list[str]],
    caption: str,
    optional: Callable[[Layout], list[str]] = lambda layout: [],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare the function below as a report figure, beside its code: the figure is named
    after the function, its module is the code that draws it (the Snakefile's code input),
    `reads` the results files it reads (the rule's inputs), `caption` its English line in
    `snakemake --report`. A new figure is its module in report/figures/ and the book page
    that shows it: nothing else lists it."""

    def declare(draw: Callable[..., Any]) -> Callable[..., Any]:
        name = draw.__name__
        known = _FIGURES.get(name)
        if known is not None and known.module != draw.__module__:
            raise ValueError(f"figure {name!r} declared in {known.module} and {draw.__module__}")
        _FIGURES[name] = Output("figures", name, draw.__module__, reads, optional, caption)
        return draw

    return declare


@functools.cache
def _figures() -> tuple[Output, ...]:
    """Every figure module imported, so each has declared itself: in module-name order, then
    in each module's order. Imported here, not at the top: the figures bring matplotlib and
    numpy (0.4 s), which only what asks for the figures pays."""
    import importlib
    import pkgutil

    # By name, not `from ... import`: the tables and the summary import this module but run
    # no figure code, and the Snakefile's code scan (workflow.code_deps) follows imports.
    figures = importlib.import_module(f"{__name__}.figures")
    for module in pkgutil.iter_modules(figures.__path__):
        importlib.import_module(f"{figures.__name__}.{module.name}")
    return tuple(_FIGURES.values())


def declared(kind: str) -> tuple[Output, ...]:
    """The declared outputs of `kind` (tables, figures, summary), in declaration order."""
    if kind == "figures":
        return _figures()
    return tuple(o for o in _DECLARED if o.kind == kind)


def names(kind: str) -> tuple[str, ...]:
    """The names of the declared outputs of `kind`."""
    return tuple(o.name for o in declared(kind))


TABLES: tuple[str, ...] = names("tables")


def __getattr__(name: str) -> Any:
    """`FIGURES`, `CAPTIONS` and `OUTPUTS` made on first use (they import the figures)."""
    if name == "FIGURES":
        return names("figures")
    if name == "CAPTIONS":
        return {**TABLE_CAPTIONS, **{o.name: o.caption for o in _figures()}}
    if name == "OUTPUTS":
        return (*declared("tables"), *_figures(), *declared("summary"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def output(kind: str, name: str) -> Output:
    """The declaration of report output `name` of `kind`."""
    for o in declared(kind):
        if o.name == name:
            return o
    raise KeyError(f"no report output {kind}/{name}; known: {', '.join(names(kind))}")


def inputs_of(layout: Layout, kind: str, name: str) -> list[str]:
    """The files output `name` of `kind` (tables, figures, summary) reads, sorted."""
    return sorted(set(output(kind, name).reads(layout)))


def optional_inputs_of(layout: Layout, kind: str, name: str) -> list[str]:
    """Files read when present: Snakemake's benchmark files (the pipeline makes them; a
    stage run by hand does not)."""
    return sorted(set(output(kind, name).optional(layout)))


def chosen(
    values: dict[str, Any], only: Sequence[str] | None, kind: str, results: str = "results"
) -> tuple[list[str], Layout]:
    """The outputs of `kind` (tables, figures) to make, `only` (default: all) each checked to
    be declared, and the layout of the results they read."""

    known = names(kind)
    wanted = list(only or known)
    for n in wanted:
        if n not in known:
            raise UserError(f"unknown {kind[:-1]} {n!r}; known: {', '.join(known)}")
    return wanted, Layout.from_config(values, results)
