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

from defectfusion.config import PHASE1_SEED_RUN

KINDS: tuple[str, ...] = ("tables", "figures", "summary")
# The config sections every report output depends on: the Snakefile's rule params, and the
# params hash in each provenance record.
PARAM_SECTIONS: tuple[str, ...] = ("data", "model", "eval", "pipeline")
# The Phase 2 model that figures set against Phase 1: the adopted variant (the thesis's
# DEIMv2-Multimodal), its best.pt as selected on val, the first seed.
ADOPTED_VARIANT = "zero_start"
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
# The post-mortem's prediction sets (defectfusion.postmortem): Phase 1 per split, and per
# Phase 2 variant and seed, (split, which checkpoint) -> file. "best" is the val-selected
# checkpoint (test only: val chose it); "epoch0" (val only: the model before any update),
# "epoch1" and "final" are fixed epochs.
PHASE1_PREDICTIONS: dict[str, str] = {
    "val": "val_metrics.predictions.json",
    "test": "test_metrics.predictions.json",
}
PHASE2_PREDICTIONS: dict[tuple[str, str], str] = {
    ("val", "epoch0"): "val_epoch0.predictions.json",  # before any update (the shift)
    ("test", "best"): "test_metrics.predictions.json",
    ("test", "epoch1"): "test_epoch1.predictions.json",
    ("test", "final"): "test_final.predictions.json",
    ("val", "epoch1"): "val_epoch1.predictions.json",
    ("val", "final"): "val_final.predictions.json",
}
# The thesis's own figures (the book's {tesis} role; the "settings" table's thesis column).
THESIS_FIGURES = "thesis/thesis_figures.yaml"
DEIMV2_RECIPE = "thesis/deimv2_recipe.yaml"  # DEIMv2's official recipe (the "recipe" table)


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
    # the study design (pipeline.phase1_seeds): the main preset's Phase 1 seeds, and the
    # config's seed, whose run is runs/phase1/MAIN (the others: MAIN_seedK)
    phase1_seeds: tuple[int, ...] = ()
    base_seed: int = 0

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
            phase1_seeds=tuple(int(s) for s in pipe.get("phase1_seeds") or ()),
            base_seed=int(values.get("seed", 0)),
        )

    # ---- the study design: Phase 1 seeds and the Phase 2 seeds fine-tuned from each -------
    @property
    def main_runs(self) -> tuple[str, ...]:
        """The main preset's Phase 1 runs, one per Phase 1 seed (one by default: ``main``)."""
        return tuple(self.phase1_run(k) for k in self.phase1_seeds or (self.base_seed,))

    @property
    def phase1_runs(self) -> tuple[str, ...]:
        """Every Phase 1 run: each preset at the config's seed, then the main preset's other
        Phase 1 seeds."""
        return tuple(dict.fromkeys([*self.presets, *self.main_runs]))

    def phase1_run(self, phase1_seed: int) -> str:
        """The folder name (under runs/phase1, results/phase1) of a main Phase 1 seed's run."""
        return self.main if phase1_seed == self.base_seed else f"{self.main}_seed{phase1_seed}"

    @property
    def phase1_of(self) -> tuple[int, ...]:
        """Each Phase 2 seed's Phase 1 run (an index into `main_runs`): consecutive blocks."""
        n = len(self.main_runs)
        return tuple(i * n // len(self.seeds) for i in range(len(self.seeds)))

    def phase1_run_of(self, seed: int) -> str:
        """The Phase 1 run Phase 2 seed ``seed`` fine-tunes."""
        return self.main_runs[self.phase1_of[self.seeds.index(int(seed))]]

    def run_preset(self, run: str) -> tuple[str, int]:
        """(preset, seed) of a Phase 1 run's folder name: a preset at the config's seed, or
        the main preset at another Phase 1 seed (``MAIN_seedK``)."""
        m = PHASE1_SEED_RUN.fullmatch(run)
        if m and m.group(1) == self.main and run not in self.presets:
            return self.main, int(m.group(2))
        return run, self.base_seed

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

    @property
    def postmortem(self) -> str:
        return f"{self.results}/postmortem.json"

    def postmortem_inputs(self) -> list[str]:
        """What `defectfusion postmortem` reads: val and test splits, Phase 1's predictions
        on both, and each variant and seed's history and prediction sets."""
        return sorted(
            {
                self.split("val"),
                self.split("test"),
                *(self.phase1(r, f) for r in self.main_runs for f in PHASE1_PREDICTIONS.values()),
                *self.all_phase2("history.jsonl"),
                *(f for name in PHASE2_PREDICTIONS.values() for f in self.all_phase2(name)),
            }
        )

    def eval_benchmark(self, preset: str) -> str:
        return f"{self.benchmarks}/evaluate_phase1_{preset}_test.tsv"

    @property
    def text(self) -> str:
        return f"{self.results}/text/embeddings.json"

    @property
    def adopted(self) -> tuple[str, int]:
        """(variant, seed) of the Phase 2 model the figures compare with Phase 1."""
        # the config requires the adopted variant (config.check_pipeline); a hand-made layout
        # without it still names one, the first, for the figures that need a Phase 2 model
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

    # ---- what the outputs read (OUTPUTS below names them per output) ----------------------
    def main_history_and_test(self) -> list[str]:
        return [
            self.phase1(self.main, "history.jsonl"),
            self.phase1(self.main, "test_metrics.json"),
        ]

    def presets_history_and_test(self) -> list[str]:
        return [
            self.phase1(p, f) for p in self.presets for f in ("history.jsonl", "test_metrics.json")
        ]

    def adopted_test(self, name: str = "test_metrics.json") -> list[str]:
        """The adopted Phase 2 model's file `name`; none when no variant ran."""
        if not self.variants:
            return []
        v, s = self.adopted
        return [self.phase2(v, s, name)]

    def test_predictions(self) -> list[str]:
        """Phase 1's and the adopted Phase 2 model's test predictions."""
        return [
            self.phase1(self.main, "test_metrics.predictions.json"),
            *self.adopted_test("test_metrics.predictions.json"),
        ]

    def postmortem_if_run(self) -> list[str]:
        return [self.postmortem] if self.variants else []

    def inputs(self, kind: str, name: str) -> list[str]:
        """The files output `name` of `kind` (tables, figures, summary) reads, sorted."""
        return sorted(set(output(kind, name).reads(self)))

    def optional_inputs(self, kind: str, name: str) -> list[str]:
        """Files read when present: Snakemake's benchmark files (the pipeline makes them; a
        stage run by hand does not)."""
        return sorted(set(output(kind, name).optional(self)))

    def stage_benchmarks(self) -> list[str]:
        """Snakemake's benchmark file of every data, training, evaluation and comparison job."""
        b = self.benchmarks
        pairs = [(v, s) for v in self.variants for s in self.seeds]
        return [
            f"{b}/data.tsv",
            f"{b}/text_embed.tsv",
            *(f"{b}/phase1_{p}.tsv" for p in self.phase1_runs),
            *(self.eval_benchmark(p) for p in self.phase1_runs),
            *(f"{b}/phase2_{v}_seed{s}.tsv" for v, s in pairs),
            *(f"{b}/evaluate_phase2_{v}_seed{s}.tsv" for v, s in pairs),
            *(f"{b}/compare_{v}_seed{s}.tsv" for v, s in pairs),
            *([f"{b}/postmortem.tsv"] if self.variants else []),
        ]


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


# ---- names and colours: one place for tables, figures and the book (issue 14) ---------------
# The book is in Spanish: every class, model and variant it shows is named here, and every
# figure draws a model in the same colour (Okabe-Ito, colour-blind safe; a name not listed
# gets a colour from OKABE_ITO by position). The CSV and LaTeX tables keep the English ids.

CLASS_NAMES_ES: dict[str, str] = {
    # the synthetic dataset (the thesis's taxonomy)
    "normal": "Normal",
    "perforation": "Perforación",
    "fracture": "Fractura",
    "scratch": "Arañazo",
    "dent": "Abolladura",
    "contamination": "Contaminación",
    # NEU-DET
    "crazing": "Cuarteado",
    "inclusion": "Inclusión",
    "patches": "Manchas",
    "pitted_surface": "Superficie picada",
    "rolled-in_scale": "Cascarilla laminada",
    "scratches": "Arañazos",
    "background": "Fondo",
}
VARIANT_NAMES_ES: dict[str, str] = {
    "zero_start": "Arranque en cero",
    "naive": "Inicialización ingenua",
    "frozen0": "α fija en 0",
    "deimv2_loss": "Pérdida de DEIMv2",
    "bn_train": "BN en modo entrenamiento",
    # the post-mortem's further candidate causes (issue 13)
    "raw_start": "Pesos sin EMA",
    "clip_norm": "Normalización de CLIP",
    "decoder_only": "Fusión solo en el decodificador",
    "thesis_replica": "Réplica de la tesis",
    # the mechanism profile's: the preprocessing dose-response and the replica's factorial
    "siglip_norm": "Normalización de SigLIP",
    "no_norm": "Sin normalización",
    "res_256": "Resolución de 256 px",
    "raw_bn": "Pesos sin EMA y BN en entrenamiento",
    "raw_clip": "Pesos sin EMA y normalización de CLIP",
    "bn_clip": "BN en entrenamiento y normalización de CLIP",
}
BACKBONE_NAMES_ES: dict[str, str] = {
    "dinov3": "DINOv3",
    "resnet": "ResNet",
    "efficientnet": "EfficientNet",
}
OKABE_ITO: tuple[str, ...] = (
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442",
)  # fmt: skip
PHASE1_COLOR = "#000000"  # the main Phase 1 model (the one Phase 2 starts from)
MODEL_COLORS: dict[str, str] = {
    # Phase 2 variants
    "zero_start": "#0072B2",
    "naive": "#D55E00",
    "frozen0": "#009E73",
    "deimv2_loss": "#CC79A7",
    "bn_train": "#E69F00",
    # the post-mortem's further variants (Paul Tol's colour-blind-safe set)
    "raw_start": "#332288",
    "clip_norm": "#44AA99",
    "decoder_only": "#999933",
    "thesis_replica": "#882255",
    # the mechanism profile's (the rest of Paul Tol's muted set, and his vibrant magenta)
    "siglip_norm": "#88CCEE",
    "no_norm": "#117733",
    "res_256": "#EE3377",
    "raw_bn": "#CC6677",
    "raw_clip": "#AA4499",
    "bn_clip": "#DDCC77",
    # Phase 1 backbones other than the main one (never a variant's colour)
    "resnet": "#56B4E9",
    "efficientnet": "#8C6D31",
}


def class_name_es(name: str) -> str:
    """The Spanish name of a class id name (unknown names as they are)."""
    return CLASS_NAMES_ES.get(name, name)


def number_es(value: float | None, spec: str = ".2f") -> str:
    """A number as the book prints it (thesis/_ext/thesis_values.py), for the figures' text and
    the summary's sentences: decimal point, a true minus sign (U+2212), never a signed zero,
    a narrow space before %; "n/d" where the run has none (an undefined metric)."""
    if value is None:
        return "n/d"
    text = format(value, spec)
    if float(text.rstrip("%")) == 0:
        text = text.lstrip("+-")
    if text.endswith("%"):
        text = text[:-1] + "\u202f%"
    return text.replace("-", "\u2212")


def variant_name_es(variant: str) -> str:
    return VARIANT_NAMES_ES.get(variant, variant)


# `text.encoder` keys as the book names them (the SigLIP keys all start with "siglip").
TEXT_ENCODER_NAMES_ES = {
    "minilm": "MiniLM (Sentence-BERT)",
    "clip-vit-b-32": "CLIP ViT-B/32",
    "random": "aleatorio (control)",
}


def text_encoder_es(key: Any) -> str:
    """The text encoder a run recorded, by its family rather than its config key."""
    key = str(key)
    return TEXT_ENCODER_NAMES_ES.get(key, "SigLIP" if key.startswith("siglip") else key)


def backbone_of(preset: str) -> str | None:
    return next((k for k in BACKBONE_NAMES_ES if k in preset), None)


def preset_setting(values: dict[str, Any], preset: str, key: str) -> Any:
    """A dotted config `key` as `preset`'s run has it: its ``pipeline.preset_overrides``
    entry, else the config's own value."""
    overrides = ((values.get("pipeline") or {}).get("preset_overrides") or {}).get(preset) or {}
    if key in overrides:
        return overrides[key]
    node: Any = values
    for part in key.split("."):
        node = (node or {}).get(part)
    return node


def backbone_name_es(preset: str, values: dict[str, Any], main: str | None = None) -> str:
    """A Phase 1 preset as every table and figure names it: its backbone family ("DINOv3",
    "ResNet") only when it started from that family's pretrained weights; from random
    weights (``model.init: scratch``) it is the bare architecture, and says so: a randomly
    initialised ViT is not DINOv3."""
    family = backbone_of(preset) or ""
    name = BACKBONE_NAMES_ES.get(family, preset)
    if preset_setting(values, preset, "model.init") == "scratch":
        name = f"{'ViT' if family == 'dinov3' else name}, pesos aleatorios"
    return f"{name} (principal)" if preset == main else name


def model_color(name: str, main: str | None = None, order: Sequence[str] = ()) -> str:
    """The colour of a Phase 2 variant or a Phase 1 preset, the same in every figure."""
    if name == main:
        return PHASE1_COLOR
    if name in MODEL_COLORS:
        return MODEL_COLORS[name]
    backbone = backbone_of(name)
    if backbone in MODEL_COLORS:
        return MODEL_COLORS[backbone]
    i = list(order).index(name) if name in order else len(name)
    return OKABE_ITO[i % len(OKABE_ITO)]
