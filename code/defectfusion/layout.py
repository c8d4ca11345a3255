"""Where every result of the pipeline lives: the results layout, one home for its paths.

`Layout` names each run's folder and file for one config (Phase 1 runs, Phase 2 variants and
seeds, evaluations, the post-mortem, benchmarks); the Snakefile, the post-mortem, the report
and the book all ask it. It sits low (config is all it imports, and no numpy) because the
analysis layer reads runs through it and the Snakefile imports it while parsing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from defectfusion.config import PHASE1_SEED_RUN

# The Phase 2 model that figures set against Phase 1: the adopted variant (the thesis's
# DEIMv2-Multimodal), its best.pt as selected on val, the first seed.
ADOPTED_VARIANT = "zero_start"
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
# The post-mortem's prediction sets (defectfusion.analysis.postmortem): Phase 1 per split, and per
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

    def qualitative_predictions(self) -> list[str]:
        """Phase 1's test predictions and every seed's of the adopted variant: the qualitative
        cases are pooled over the seeds (`metrics.pooled_cases`)."""
        if not self.variants:
            return [self.phase1(self.main, "test_metrics.predictions.json")]
        v = self.adopted[0]
        return [
            self.phase1(self.main, "test_metrics.predictions.json"),
            *(self.phase2(v, s, "test_metrics.predictions.json") for s in self.seeds),
        ]

    def postmortem_if_run(self) -> list[str]:
        return [self.postmortem] if self.variants else []

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
