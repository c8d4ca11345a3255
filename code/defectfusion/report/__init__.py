"""Tables, figures, provenance and the thesis book, from the files the stages wrote.

The report stage reads results files only, never a checkpoint, and holds no typed number.
`Layout` is where each result lives and which files each table and figure reads: the
Snakefile declares exactly these inputs (``Layout.inputs``), so an output is rebuilt when,
and only when, a file it reads changes. This module stays light (no numpy, no matplotlib):
the Snakefile imports it while parsing.

Outputs, by name (``Layout.inputs(kind, name)``)::

    results/tables/NAME.{csv,md,tex}   TABLES      (defectfusion.report.tables)
    figures/NAME.{png,pdf}             FIGURES     (defectfusion.report.figures)
    results/summary.json               the book's numbers (defectfusion.report.summary)
    results/provenance/KIND/NAME.json  one provenance record per output (report.provenance)
    results/provenance.json            the index of all records
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TABLES: tuple[str, ...] = ("dataset", "phase1", "phase2", "per_class_recall")
FIGURES: tuple[str, ...] = (
    "dataset_examples",
    "phase1_curves",
    "postmortem",
    "initialisation",
    "gate_dynamics",
    "confusion",
    "per_class",
    "pr_curves",
    "qualitative",
    "prompt_similarity",
)
KINDS: tuple[str, ...] = ("tables", "figures", "summary")
# The config sections every report output depends on: the Snakefile's rule params, and the
# params hash in each provenance record.
PARAM_SECTIONS: tuple[str, ...] = ("data", "model", "eval", "pipeline")
# The Phase 2 model that figures set against Phase 1: the adopted variant (the thesis's
# DEIMv2-Multimodal), its best.pt as selected on val, the first seed.
ADOPTED_VARIANT = "zero_start"
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Layout:
    """Where the pipeline's results are, for one config (paths relative to the workdir)."""

    data_dir: str
    presets: tuple[str, ...]
    main: str  # the Phase 1 preset Phase 2 builds on
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    results: str = "results"
    benchmarks: str = "benchmarks/results"

    @classmethod
    def from_config(cls, values: dict[str, Any], results: str = "results") -> Layout:
        """From a config dict: Snakemake's ``config`` or ``Config.to_dict()``."""
        pipe = values.get("pipeline") or {}
        main = values["model"]["preset"]
        return cls(
            data_dir=str(values["data"]["dir"]),
            presets=tuple(pipe.get("presets") or [main]),
            main=main,
            variants=tuple(pipe.get("variants") or ()),
            seeds=tuple(int(s) for s in pipe.get("seeds") or [values.get("seed", 0)]),
            results=results,
        )

    # ---- single files -------------------------------------------------------------------
    def split(self, split: str) -> str:
        return f"{self.data_dir}/annotations/{split}.json"

    def phase1(self, preset: str, name: str) -> str:
        """``name``: history.jsonl, test_metrics.json or test_metrics.predictions.json."""
        return f"{self.results}/phase1/{preset}/{name}"

    def phase2(self, variant: str, seed: int, name: str) -> str:
        """``name``: history.jsonl, steps.jsonl, test_metrics[.predictions].json."""
        return f"{self.results}/phase2/{variant}/seed{seed}/{name}"

    def compare(self, variant: str, seed: int) -> str:
        return f"{self.results}/compare/{variant}_seed{seed}.json"

    def eval_benchmark(self, preset: str) -> str:
        return f"{self.benchmarks}/evaluate_phase1_{preset}.tsv"

    @property
    def text(self) -> str:
        return f"{self.results}/text/embeddings.json"

    @property
    def adopted(self) -> tuple[str, int]:
        """(variant, seed) of the Phase 2 model the figures compare with Phase 1."""
        variant = ADOPTED_VARIANT if ADOPTED_VARIANT in self.variants else self.variants[0]
        return variant, self.seeds[0]

    # ---- groups -------------------------------------------------------------------------
    def splits(self) -> list[str]:
        return [self.split(s) for s in SPLIT_NAMES]

    def all_phase2(self, name: str, variants: tuple[str, ...] | None = None) -> list[str]:
        return [self.phase2(v, s, name) for v in variants or self.variants for s in self.seeds]

    @property
    def init_variants(self) -> tuple[str, ...]:
        """The variants the initialisation figure sets side by side (zero-start vs naive)."""
        return tuple(v for v in ("zero_start", "naive") if v in self.variants) or self.variants

    def inputs(self, kind: str, name: str) -> list[str]:
        """The files output `name` of `kind` (tables, figures, summary) reads, sorted."""
        main1 = [
            self.phase1(self.main, "history.jsonl"),
            self.phase1(self.main, "test_metrics.json"),
        ]
        v, s = self.adopted if self.variants else (None, None)
        adopted = [self.phase2(v, s, "test_metrics.json")] if v else []
        preds = [
            self.phase1(self.main, "test_metrics.predictions.json"),
            *([self.phase2(v, s, "test_metrics.predictions.json")] if v else []),
        ]
        every = {
            ("tables", "dataset"): self.splits(),
            ("tables", "phase1"): [
                *(
                    self.phase1(p, f)
                    for p in self.presets
                    for f in ("history.jsonl", "test_metrics.json")
                ),
            ],
            ("tables", "phase2"): [
                *main1,
                *self.all_phase2("history.jsonl"),
                *self.all_phase2("test_metrics.json"),
                *(self.compare(v, s) for v in self.variants for s in self.seeds),
            ],
            ("tables", "per_class_recall"): [self.phase1(self.main, "test_metrics.json"), *adopted],
            ("figures", "dataset_examples"): [self.split("train")],
            ("figures", "phase1_curves"): [self.phase1(p, "history.jsonl") for p in self.presets],
            ("figures", "postmortem"): [
                self.phase1(self.main, "history.jsonl"),
                *self.all_phase2("history.jsonl"),
            ],
            ("figures", "initialisation"): [
                self.phase1(self.main, "history.jsonl"),
                *self.all_phase2("history.jsonl", self.init_variants),
            ],
            ("figures", "gate_dynamics"): [
                *self.all_phase2("history.jsonl"),
                *self.all_phase2("steps.jsonl"),
            ],
            ("figures", "confusion"): [self.phase1(self.main, "test_metrics.json"), *adopted],
            ("figures", "per_class"): [self.phase1(self.main, "test_metrics.json"), *adopted],
            ("figures", "pr_curves"): [self.split("test"), *preds],
            ("figures", "qualitative"): [self.split("test"), *preds],
            ("figures", "prompt_similarity"): [self.text],
            ("summary", "summary"): [
                *self.splits(),
                *(
                    self.phase1(p, f)
                    for p in self.presets
                    for f in ("history.jsonl", "test_metrics.json")
                ),
                *self.all_phase2("history.jsonl"),
                *self.all_phase2("steps.jsonl"),
                *self.all_phase2("test_metrics.json"),
                *(self.compare(v, s) for v in self.variants for s in self.seeds),
            ],
        }
        key = (kind, name)
        if key not in every:
            known = sorted(f"{k}/{n}" for k, n in every)
            raise KeyError(f"no report output {kind}/{name}; known: {', '.join(known)}")
        return sorted(set(every[key]))

    def optional_inputs(self, kind: str, name: str) -> list[str]:
        """Files read when present: Snakemake's benchmark files (the pipeline makes them; a
        stage run by hand does not)."""
        if (kind, name) == ("tables", "phase1"):
            return [self.eval_benchmark(p) for p in self.presets]
        return []


def chosen(only: Sequence[str] | None, known: tuple[str, ...], kind: str) -> list[str]:
    """The outputs to make: `only` (default: all `known`), each checked to be one of them."""
    from defectfusion.errors import UserError

    names = list(only or known)
    for n in names:
        if n not in known:
            raise UserError(f"unknown {kind} {n!r}; known: {', '.join(known)}")
    return names
