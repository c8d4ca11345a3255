"""Tables, figures, provenance and the thesis book, from the files the stages wrote.

The report stage reads results files only, never a checkpoint, and holds no typed number.
`Layout` is where each result lives and which files each table and figure reads: the
Snakefile declares exactly these inputs (``Layout.inputs``), so an output is rebuilt when,
and only when, a file it reads changes. This module stays light (no numpy, no matplotlib):
the Snakefile imports it while parsing.

Every output is declared once, in ``OUTPUTS``: its kind and name, the module that makes it
and the results files it reads. The Snakefile (each job's inputs, its code), the provenance
records, `write_figures` and the book's checks all read that one list::

    results/tables/NAME.{csv,md,tex}   TABLES      (defectfusion.report.tables)
    figures/NAME.{png,pdf}             FIGURES     (defectfusion.report.figures.*, one module
                                                    per figure or small family)
    results/summary.json               the book's numbers (defectfusion.report.summary)
    results/provenance/KIND/NAME.json  one provenance record per output (report.provenance)
    results/provenance.json            the index of all records
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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


_TABLES = "defectfusion.report.tables"
_FIG = "defectfusion.report.figures"
OUTPUTS: tuple[Output, ...] = (
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
    # figures (report/figures/NAME.py)
    Output("figures", "dataset_examples", f"{_FIG}.dataset_examples",
           lambda L: [L.split("train")]),
    Output("figures", "phase1_curves", f"{_FIG}.phase1_curves",
           lambda L: [L.phase1(p, "history.jsonl") for p in L.presets]),
    Output("figures", "postmortem", f"{_FIG}.postmortem",
           lambda L: [L.phase1(L.main, "history.jsonl"), *L.all_phase2("history.jsonl")]),
    Output("figures", "initialisation", f"{_FIG}.initialisation", lambda L: [
        L.phase1(L.main, "history.jsonl"), *L.all_phase2("history.jsonl", L.init_variants),
    ]),
    Output("figures", "gate_dynamics", f"{_FIG}.gate_dynamics",
           lambda L: [*L.all_phase2("history.jsonl"), *L.all_phase2("steps.jsonl")]),
    Output("figures", "confusion", f"{_FIG}.confusion",
           lambda L: [L.phase1(L.main, "test_metrics.json"), *L.adopted_test()]),
    Output("figures", "per_class", f"{_FIG}.per_class",
           lambda L: [L.phase1(L.main, "test_metrics.json"), *L.adopted_test()]),
    Output("figures", "pr_curves", f"{_FIG}.pr_curves",
           lambda L: [L.split("test"), *L.test_predictions()]),
    Output("figures", "qualitative", f"{_FIG}.qualitative",
           lambda L: [L.split("test"), *L.test_predictions()]),
    Output("figures", "prompt_similarity", f"{_FIG}.prompt_similarity", lambda L: [L.text]),
    # the post-mortem (issue 13): one module for its two figures
    Output("figures", "postmortem_forest", f"{_FIG}.postmortem_intervals",
           lambda L: [L.postmortem]),
    Output("figures", "postmortem_mechanism", f"{_FIG}.postmortem_intervals",
           lambda L: [L.postmortem]),
    Output("figures", "postmortem_drift", f"{_FIG}.postmortem_intervals",
           lambda L: [*L.all_phase2("history.jsonl"), L.phase1(L.main, "history.jsonl"),
                      THESIS_FIGURES]),
    # the book's numbers (report/summary.py)
    Output("summary", "summary", "defectfusion.report.summary", lambda L: [
        *L.splits(), *L.presets_history_and_test(), *L.all_phase2("history.jsonl"),
        *L.all_phase2("steps.jsonl"), *L.all_phase2("test_metrics.json"),
        L.postmortem,  # every interval (the compare files are per seed)
        *L.test_predictions(),  # the qualitative figure's cases, counted
        L.text,  # the prompts' similarities (figure prompt_similarity), read out
    ], lambda L: L.stage_benchmarks()),  # the run's duration on the clock
)  # fmt: skip


# One line per table and figure: its caption in `snakemake --report` (report/*.rst reads it
# through the rules' `caption` param). The book writes its own Spanish captions.
CAPTIONS: dict[str, str] = {
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
    "dataset_examples": "A few training images of each class with their boxes.",
    "phase1_curves": "Phase 1 training loss and validation mAP per epoch, per preset.",
    "postmortem": "Validation mAP per Phase 2 epoch (0: before any update) of every variant, "
    "beside Phase 1's best: the epoch-1 drop the thesis saw, or its absence.",
    "initialisation": "Zero-start against the naive initialisation: validation mAP per epoch.",
    "gate_dynamics": "The fusion gate alpha and temperature tau per step.",
    "confusion": "Confusion matrix at the operating point, Phase 1 and adopted Phase 2.",
    "per_class": "AP and recall per class, Phase 1 against the adopted Phase 2 variant.",
    "pr_curves": "Precision-recall curves per class on the test split.",
    "qualitative": "Test images with their boxes: hits, misses and false alarms.",
    "prompt_similarity": "Cosine similarity of the class prompts' text embeddings.",
    "postmortem_forest": "Each hypothesis's epoch-1 drift with its adjusted interval, against "
    "the thesis's drop and the equivalence margin.",
    "postmortem_mechanism": "The drift split into its epoch-0 shift (before any update) and its "
    "epoch-1 adaptation, per hypothesis.",
    "postmortem_drift": "Validation mAP change from Phase 1 per epoch and variant, beside the "
    "thesis's drop.",
}


def names(kind: str) -> tuple[str, ...]:
    """The declared outputs of `kind` (tables, figures, summary), in declaration order."""
    return tuple(o.name for o in OUTPUTS if o.kind == kind)


TABLES: tuple[str, ...] = names("tables")
FIGURES: tuple[str, ...] = names("figures")


def output(kind: str, name: str) -> Output:
    """The declaration of report output `name` of `kind`."""
    for o in OUTPUTS:
        if (o.kind, o.name) == (kind, name):
            return o
    known = ", ".join(f"{o.kind}/{o.name}" for o in OUTPUTS)
    raise KeyError(f"no report output {kind}/{name}; known: {known}")


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
    from defectfusion.errors import UserError

    known = names(kind)
    wanted = list(only or known)
    for n in wanted:
        if n not in known:
            raise UserError(f"unknown {kind[:-1]} {n!r}; known: {', '.join(known)}")
    return wanted, Layout.from_config(values, results)
