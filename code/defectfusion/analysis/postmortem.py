"""`defectfusion postmortem`: what each candidate cause of the thesis's epoch-1 drop does.

The thesis saw Phase 2's validation mAP fall from 0.785 (Phase 1) to 0.671 after one epoch
of a zero-start fusion, which should have started exactly at Phase 1. Each Phase 2 variant
of `pipeline.variants` switches one candidate cause on (or off) against the adopted
zero-start. This stage measures, with intervals that cover both the images and the Phase 2
seeds (`defectfusion.analysis.bootstrap`, hierarchical bootstrap):

- ``drift``: epoch 1 and the last epoch minus Phase 1, on the same images (val: the
  thesis's setting; test), per variant; the val-selected checkpoint ("best") on test too;
- ``contrasts``: every variant against Phase 1, and every other variant against the
  adopted zero-start (paired by seed), for every metric, split and checkpoint;
- ``verdict`` per variant (hypothesis): the branch of the decision rule declared in
  params.yaml's ``postmortem`` section (`judge`: reproduces, partial, opposite, equivalent,
  inconclusive), with the values that decided it; ``outcome``: which hypotheses fall in each
  branch and whether the thesis's drop is explained (only by one that reproduces it);
- ``mechanism`` per variant: the epoch-1 drift taken apart into the shift before any update
  (epoch 0 - Phase 1) and the first epoch's adaptation (epoch 1 - epoch 0);
- ``effects``: differences named for what they measure (`EFFECTS`: the text is zero_start -
  frozen0, the loss switch zero_start - deimv2_loss, the heads' fine-tuning frozen0 -
  Phase 1); ``factorial``: main effects and interactions of the thesis replica's three
  switches when the run has the eight cells (configs/mechanism.yaml);
- the operating point: each critical class's recall at score >= eval.score_threshold and
  IoU eval.iou_match, with intervals; and score calibration: that recall over a sweep of
  score thresholds, and the mean score of the true positives (MAL trains a positive's
  score toward its IoU, focal loss toward 1: a loss switch moves fixed-threshold recall).

Every prediction set is matched once and evaluated on the same image replicates (one per
split), and the seed replicates are shared, so each set's metrics are computed once.

Output schema (``results/postmortem.json``)::

    {"n_boot", "seed", "ci_level": 95, "seconds": wall time of the stage, "cpu_seconds",
     "n_sets": prediction sets read,
     "seeds": Phase 2 seeds, "phase1_runs": the main Phase 1 runs (one per Phase 1 seed),
     "phase1_of": each Phase 2 seed's Phase 1 run (an index into phase1_runs),
     "adopted": the adopted variant, "variants": [names],
     "critical_classes": [names], "composite_weights", "n_images": {"val", "test"},
     "operating_point": {"score_threshold", "iou"},
     "metrics": [metric names: map, critical_recall, composite, map50, critical_recall50,
                 op_recall_critical (mean over critical classes), op_recall_<class>],
     "covers": {"vs_phase1", "vs_adopted", "phase1_values", "phase2_values"}: what the
               intervals of each kind resample and what they do not,
     "thesis": {"phase1", "epoch1", "drop", "source"},
     "phase1": {split: {metric: {"value", "ci", "levels", "per_seed"}}} (over its runs),
     "phase2": {variant: {
         "values": {which: {split: {metric: {"value": mean over seeds, "ci", "per_seed"}}}},
         "drift": {"epoch1"|"final": {"val"|"test": {metric: {"diff", "ci", "n_seeds",
                   "n_valid", "frac_gt_0", "value_a", "value_b", "verdict"}}},
                   "best": {"test": {...}}},
         "verdict": {"branch": one of BRANCHES, and a boolean per branch, "why", "metric",
                     "split", "which", "diff", "ci" (95 %), "ci_adjusted", "level_adjusted",
                     "p", "p_adjusted", "excludes_zero", "test": {"diff", "ci_adjusted",
                     "sign", "agrees"}, "relative", "detectable_drop" (80 % power),
                     "reproduce_threshold", "thesis_relative", "fraction_of_thesis",
                     "min_fraction", "equivalence_margin", "within_margin", "thesis_drop",
                     "ratio_to_thesis", "final": sign of the last-epoch val drift,
                     "vs_adopted": {"diff", "ci_adjusted", "sign", "verdict"} or null},
         "mechanism": {"shift_epoch0", "adaptation_epoch1", "drift_epoch1": {"diff", "ci",
                       "se", "seed_se", "image_se", "df"}},
         "history": {"epoch1_val_map": [per seed], "final_epoch": [per seed],
                     "max_abs_diff_epoch1": |history - recomputed| (a consistency check)}}},
     "contrasts": [{"a", "b", "metric", "split", "which", "diff", "ci", "n_seeds", "n_valid",
                    "frac_b_gt_a", "verdict", "covers"}],
     "calibration": {"thresholds", "iou", "phase1": {split: CAL}, "phase2": {variant:
                     {which: {split: CAL}}}}, CAL = {"critical": [recall per threshold],
                     "per_class": {class: [...]}, "tp_score_mean"} (mean over seeds),
     "rule": params.yaml's postmortem section with "n_hypotheses", "level_each",
             "interval": "seed_t", "thesis_relative",
     "effects": {name: {"b", "a", which: {split: {metric: diff}}}},
     "factorial": null or {"cells", "epoch0"|"epoch1": {term: diff}},
     "outcome": {"adopted_branch", "adopted_drop", "<branch>_variants", "n_<branch>",
                 "removing_variants", "n_removing", "explained", "no_drop", "open"},
     "coverage": null or `coverage.interval_coverage`'s result with "seconds"}

Every interval is `bootstrap.hierarchical_diff`'s seed_t interval (images and Phase 2 seeds);
its ``levels`` say what it resampled, and "coverage" whether it covers at this run's design
(simulated, `analysis.coverage`).
With several Phase 1 seeds (`pipeline.phase1_seeds`, configs/study.yaml) each Phase 2 seed is
set against its own Phase 1 run and the intervals resample Phase 1 seeds, the Phase 2 seeds
within each, and the images (`bootstrap.nested_replicates`, `bootstrap.nested_spread`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from defectfusion.analysis.bootstrap import (
    CI_LEVEL,
    EXTRA,
    METRICS,
    PerImageEval,
    SetMetrics,
    _iou_index,
    contrast,
    detectable_drop,
    drift,
    hierarchical_diff,
    image_replicates,
    linear_combination,
    metric_key,
    nested_replicates,
    seed_replicates,
    seed_t_interval,
    t_p_value,
    verdict,
)
from defectfusion.analysis.coverage import interval_coverage
from defectfusion.config import PostmortemSection
from defectfusion.core.errors import UserError
from defectfusion.core.fsutil import atomic_write_json, os_error_message
from defectfusion.core.jsonio import load_json, read_jsonl
from defectfusion.evaluation.metrics import check_critical, check_results
from defectfusion.layout import (
    ADOPTED_VARIANT,
    PHASE1_PREDICTIONS,
    PHASE2_PREDICTIONS,
    Layout,
)

SPLITS = ("val", "test")
WHICH = ("best", "epoch1", "final")
THESIS_FIGURES = Path("thesis/thesis_figures.yaml")
SWEEP = tuple(round(float(t), 2) for t in np.arange(0.05, 1.0, 0.05))


def thesis_drop(path: Path = THESIS_FIGURES) -> dict[str, Any]:
    """The thesis's epoch-1 change of val mAP, from thesis_figures.yaml when it has both ends."""
    try:
        fig = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        p1 = float(fig["map_phase1"]["value"])
        e1 = float(fig["map_epoch1_zero_start"]["value"])
        source = f"{path}: map_epoch1_zero_start - map_phase1"
    except OSError as e:  # no typed copy of the thesis's numbers to fall back on
        raise UserError(f"{path}: {os_error_message(e)} (the thesis's epoch-1 drop)") from None
    except (KeyError, TypeError, ValueError, yaml.YAMLError):
        raise UserError(
            f"{path}: needs numeric map_phase1.value and map_epoch1_zero_start.value "
            "(the thesis's epoch-1 drop, quoted beside each verdict)"
        ) from None
    if not (p1 > 0 and e1 < p1):
        raise UserError(
            f"{path}: map_phase1.value must be > 0 and map_epoch1_zero_start.value below it "
            "(the thesis's drop, which every verdict is sized against)"
        )
    return {"phase1": p1, "epoch1": e1, "drop": round(e1 - p1, 6), "source": source}


def _covers(n_seeds: int, n_phase1: int = 1) -> dict[str, str]:
    """What each kind of interval resamples, in words (the book quotes it)."""
    if n_phase1 > 1:
        per = n_seeds // n_phase1
        seeds = (
            f"the {n_phase1} Phase 1 seeds and the {per} Phase 2 seeds on each"
            if per > 1
            else f"the {n_phase1} Phase 1 seeds (one Phase 2 seed on each)"
        )
        return {
            "vs_phase1": (
                f"the images of the split, {seeds}, resampled in that nesting (each Phase 2 "
                "run against its own Phase 1 run)"
            ),
            "vs_adopted": f"the images of the split and {seeds} (paired by seed), resampled",
            "phase1_values": f"the images of the split and the {n_phase1} Phase 1 seeds",
            "phase2_values": f"the images of the split and {seeds}, resampled",
        }
    seeds = (
        f"the {n_seeds} Phase 2 seeds"
        if n_seeds > 1
        else "nothing of Phase 2's training (one seed: its variance is not covered)"
    )
    return {
        "vs_phase1": (
            f"the images of the split and {seeds}, resampled; conditional on the one "
            "Phase 1 training run (its training variance is not covered)"
        ),
        "vs_adopted": f"the images of the split and {seeds} (paired by seed), resampled",
        "phase1_values": "the images of the split only (one Phase 1 training run)",
        "phase2_values": f"the images of the split and {seeds}, resampled",
    }


def _load(path: str, gt: dict[str, Any]) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        raise UserError(f"{path}: file not found (the post-mortem needs every prediction set)")
    results = load_json(path)
    if not isinstance(results, list):
        raise UserError(f"{path}: expected a COCO results list")
    try:
        check_results(gt, results)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return results


def _history(path: str) -> list[dict[str, Any]]:
    return read_jsonl(path)


class _Sets:
    """Reads and evaluates every prediction set on shared replicates."""

    def __init__(self, values: dict[str, Any], layout: Layout, n_boot: int, seed: int):
        self.layout = layout
        self.critical = [int(c) for c in values["data"]["critical_classes"]]
        self.weights = dict(values["eval"]["composite_weights"])
        self.threshold = float(values["eval"]["score_threshold"])
        self.iou = float(values["eval"]["iou_match"])
        _iou_index(self.iou)  # a bad eval.iou_match fails before anything is read
        rng = np.random.default_rng(seed)
        self.gt, self.counts = {}, {}
        for split in SPLITS:
            gt = load_json(layout.split(split))
            check_critical(gt, self.critical)
            self.gt[split] = gt
            self.counts[split] = image_replicates(len(gt["images"]), n_boot, rng)
        # The study design (pipeline.phase1_seeds): with several Phase 1 runs, the replicates
        # draw Phase 1 seeds, then Phase 2 seeds within each; `phase1_of` goes to every
        # interval (None: one Phase 1 run, every interval conditional on it).
        self.phase1_of: tuple[int, ...] | None = (
            layout.phase1_of if len(layout.main_runs) > 1 else None
        )
        self.seed_idx = (
            seed_replicates(len(layout.seeds), n_boot, rng)
            if self.phase1_of is None
            else nested_replicates(self.phase1_of, n_boot, rng)
        )
        self.phase1_idx = seed_replicates(len(layout.main_runs), n_boot, rng)
        cats = self.gt["test"]["categories"]
        self.names = {c["id"]: c["name"] for c in cats}
        self.op_keys = [metric_key(self.names[k]) for k in self.critical]
        self.metrics = [*METRICS, *EXTRA, "op_recall_critical", *self.op_keys]
        self.n_sets = 0
        self.cpu_match = 0.0  # CPU seconds over every process (the workers' included)
        self.cpu_replicates = 0.0

    def evaluate(self, path: str, split: str) -> tuple[SetMetrics, dict[str, Any], float, float]:
        """The set's metrics on every replicate, its calibration on the full split, and the
        CPU seconds of reading and matching it and of its replicates."""
        gt = self.gt[split]
        t0 = time.process_time()
        ev = PerImageEval(gt, _load(path, gt))
        t1 = time.process_time()
        sm = SetMetrics.compute(
            ev, self.counts[split], self.critical, self.weights, self.names,
            self.threshold, self.iou,
        )  # fmt: skip
        cal = self.calibration(ev)
        return sm, cal, t1 - t0, time.process_time() - t1

    def evaluate_all(
        self, jobs: list[tuple[str, str]], workers: int
    ) -> list[tuple[SetMetrics, dict[str, Any]]]:
        """`evaluate` of each (path, split), in order; with ``workers > 1``, in that many
        processes (each set is independent: the replicates are drawn here, once)."""
        if workers > 1 and len(jobs) > 1:
            from defectfusion.core.pool import spawn_pool

            with spawn_pool(min(workers, len(jobs)), _init_worker, (self,)) as pool:
                done = list(pool.map(_evaluate_job, jobs))
        else:
            done = [self.evaluate(path, split) for path, split in jobs]
        for _, _, match, reps in done:
            self.cpu_match += match
            self.cpu_replicates += reps
        self.n_sets += len(done)
        return [(sm, cal) for sm, cal, _, _ in done]

    def calibration(self, ev: PerImageEval) -> dict[str, Any]:
        sweep = ev.recall_at(None, SWEEP, self.iou, self.critical)
        per_class = {self.names[k]: _floats(sweep[k][0]) for k in self.critical}
        stack = np.stack([sweep[k][0] for k in self.critical])  # NaN: no box of the class
        ok = ~np.isnan(stack)
        with np.errstate(invalid="ignore", divide="ignore"):
            crit = np.where(ok, stack, 0.0).sum(axis=0) / ok.sum(axis=0)
        t = _iou_index(self.iou)
        tp_scores = np.concatenate([c.scores[c.tp[t]] for c in ev.per_class])
        return {
            "critical": _floats(crit),
            "per_class": per_class,
            "tp_score_mean": float(tp_scores.mean()) if tp_scores.size else None,
        }


_WORKER: _Sets | None = None  # a worker process's copy (set by _init_worker)


def _init_worker(sets: _Sets) -> None:
    global _WORKER
    _WORKER = sets


def _evaluate_job(job: tuple[str, str]) -> tuple[SetMetrics, dict[str, Any], float, float]:
    if _WORKER is None:
        raise RuntimeError("postmortem worker not initialised")
    return _WORKER.evaluate(*job)


def _floats(a: np.ndarray) -> list[float | None]:
    return [None if np.isnan(x) else float(x) for x in np.asarray(a, dtype=np.float64)]


def _mean_lists(lists: Sequence[Sequence[float | None]]) -> list[float | None]:
    out = []
    for vals in zip(*lists, strict=True):
        ok = [v for v in vals if v is not None]
        out.append(float(np.mean(ok)) if ok else None)
    return out


def _mean_cal(cals: Sequence[dict[str, Any]]) -> dict[str, Any]:
    scores = [c["tp_score_mean"] for c in cals if c["tp_score_mean"] is not None]
    return {
        "critical": _mean_lists([c["critical"] for c in cals]),
        "per_class": {
            k: _mean_lists([c["per_class"][k] for c in cals]) for k in cals[0]["per_class"]
        },
        "tp_score_mean": float(np.mean(scores)) if scores else None,
    }


def run_postmortem(
    values: dict[str, Any],
    out: str | Path,
    results: str = "results",
    n_boot: int | None = None,
    seed: int | None = None,
    thesis_figures: Path = THESIS_FIGURES,
    jobs: int = 1,
) -> dict[str, Any]:
    """Measure drifts, contrasts and verdicts (module docstring) and write `out`; `jobs`
    processes read and evaluate the prediction sets."""
    start, cpu_start = time.perf_counter(), time.process_time()
    layout = Layout.from_config(values, results)
    if not layout.variants:
        raise UserError("pipeline.variants: no Phase 2 variant to examine")
    n_boot = int(values.get("pipeline", {}).get("bootstrap", 1000) if n_boot is None else n_boot)
    if n_boot < 1:
        raise UserError(f"n_boot={n_boot}: need at least 1 bootstrap replicate")
    seed = int(values.get("seed", 0) if seed is None else seed)
    rule = rule_of(values)
    if ADOPTED_VARIANT not in layout.variants:  # the reference of every contrast and effect
        raise UserError(
            f"pipeline.variants {list(layout.variants)}: the post-mortem compares every "
            f"variant with the adopted {ADOPTED_VARIANT}; add it to the list"
        )
    adopted = ADOPTED_VARIANT
    sets = _Sets(values, layout, n_boot, seed)
    covers = _covers(len(layout.seeds), len(layout.main_runs))
    metrics = sets.metrics
    p1of = sets.phase1_of

    # Every file is checked to exist before minutes of work.
    p1_keys = [(r, split) for r in layout.main_runs for split in PHASE1_PREDICTIONS]
    p1_jobs = [(layout.phase1(r, PHASE1_PREDICTIONS[split]), split) for r, split in p1_keys]
    p2_keys = [
        (v, sw, s) for v in layout.variants for sw in PHASE2_PREDICTIONS for s in layout.seeds
    ]
    p2_jobs = [(layout.phase2(v, s, PHASE2_PREDICTIONS[sw]), sw[0]) for v, sw, s in p2_keys]
    for path, _ in [*p1_jobs, *p2_jobs]:
        if not Path(path).is_file():
            raise UserError(f"{path}: file not found (the post-mortem needs every prediction set)")
    done = sets.evaluate_all([*p1_jobs, *p2_jobs], jobs)
    # split -> one SetMetrics per Phase 1 run (one by default)
    phase1: dict[str, list[SetMetrics]] = {split: [] for split in PHASE1_PREDICTIONS}
    cals1: dict[str, list[dict[str, Any]]] = {split: [] for split in PHASE1_PREDICTIONS}
    for (_, split), (sm, cal) in zip(p1_keys, done[: len(p1_jobs)], strict=True):
        phase1[split].append(sm)
        cals1[split].append(cal)
    cal1 = {split: _mean_cal(c) for split, c in cals1.items()}
    # each Phase 2 seed's own Phase 1 run: the reference of its drift
    ref = {split: [sms[i] for i in layout.phase1_of] for split, sms in phase1.items()}
    # per variant: (split, which) -> one SetMetrics per seed
    p2: dict[str, dict[tuple[str, str], list[SetMetrics]]] = {}
    cal2: dict[str, dict[str, dict[str, Any]]] = {}
    by_key = dict(zip(p2_keys, done[len(p1_jobs) :], strict=True))
    for v in layout.variants:
        p2[v], cal2[v] = {}, {}
        for split, which in PHASE2_PREDICTIONS:
            evaluated = [by_key[v, (split, which), s] for s in layout.seeds]
            p2[v][split, which] = [sm for sm, _ in evaluated]
            cal2[v].setdefault(which, {})[split] = _mean_cal([c for _, c in evaluated])

    idx = sets.seed_idx
    thesis = thesis_drop(thesis_figures)
    # Phase 1's value: its runs' mean (one run by default: the images resampled only)
    out_p1 = {
        split: {m: _value(sms, sets.phase1_idx, m) for m in metrics}
        for split, sms in phase1.items()
    }
    if len(layout.main_runs) > 1:  # its seeds are Phase 1's (seed_spread names Phase 2's)
        for block in out_p1.values():
            for x in block.values():
                x["levels"] = "phase1_seeds+images" if x["levels"] else None
    out_p2: dict[str, Any] = {}
    contrasts: list[dict[str, Any]] = []
    for v in layout.variants:
        vals: dict[str, Any] = {}
        drifts: dict[str, Any] = {}
        for (split, which), group in p2[v].items():
            vals.setdefault(which, {})[split] = {m: _value(group, idx, m, p1of) for m in metrics}
            d = drift(group, ref[split], idx, metrics, p1of)
            drifts.setdefault(which, {})[split] = {
                m: {**x, "verdict": verdict(x["ci"])} for m, x in d.items()
            }
            for m, x in d.items():
                contrasts.append(
                    {"a": "phase1", "b": v, "metric": m, "split": split, "which": which,
                     **_contrast_fields(x), "covers": covers["vs_phase1"]}
                )  # fmt: skip
            if v != adopted:
                c = contrast(p2[adopted][split, which], group, idx, metrics, p1of)
                for m, x in c.items():
                    contrasts.append(
                        {"a": adopted, "b": v, "metric": m, "split": split, "which": which,
                         **_contrast_fields(x), "covers": covers["vs_adopted"]}
                    )  # fmt: skip
        out_p2[v] = {
            "values": vals,
            "drift": drifts,
            "verdict": judge(
                drifts["epoch1"]["val"]["map"],
                drifts["epoch1"]["test"]["map"],
                out_p1["val"]["map"]["value"],
                thesis,
                rule,
                len(layout.variants),
            ),
            "mechanism": _mechanism(drifts, p2[v], idx, p1of),
            "history": _history_check(layout, v, vals),
        }
        out_p2[v]["verdict"]["vs_adopted"] = _vs_adopted(
            v, adopted, contrasts, rule, len(layout.variants)
        )
        out_p2[v]["verdict"]["final"] = verdict(drifts["final"]["val"]["map"]["ci"])

    outcome = _outcome(out_p2, adopted)
    effects = named_effects(p2, ref, idx, metrics, p1of)
    factorial = factorial_effects(p2, values, idx, p1of)
    coverage = check_coverage(values, layout, rule, len(sets.gt["val"]["images"]), n_boot, seed)
    seconds = time.perf_counter() - start
    # on a shared machine, what the stage itself used (its workers' sets included)
    cpu = (
        time.process_time() - cpu_start + (sets.cpu_match + sets.cpu_replicates if jobs > 1 else 0)
    )
    result = {
        "n_boot": n_boot,
        "seed": seed,
        "ci_level": int(CI_LEVEL),
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "n_sets": sets.n_sets,
        "seeds": list(layout.seeds),
        # the study design: the main Phase 1 runs, and each Phase 2 seed's (an index)
        "phase1_runs": list(layout.main_runs),
        "phase1_of": list(layout.phase1_of),
        "adopted": adopted,
        "variants": list(layout.variants),
        "critical_classes": [sets.names[k] for k in sets.critical],
        "composite_weights": sets.weights,
        "n_images": {s: len(sets.gt[s]["images"]) for s in SPLITS},
        "operating_point": {"score_threshold": sets.threshold, "iou": sets.iou},
        "metrics": list(metrics),
        "covers": covers,
        "thesis": thesis,
        "phase1": out_p1,
        "phase2": out_p2,
        "contrasts": contrasts,
        "calibration": {
            "thresholds": list(SWEEP),
            "iou": sets.iou,
            "phase1": cal1,
            "phase2": cal2,
        },
        "rule": {**rule, "n_hypotheses": len(layout.variants),
                 "level_each": adjusted_level(rule, len(layout.variants)),
                 "interval": "seed_t", "thesis_relative": thesis_relative(thesis)},
        "effects": effects,
        "factorial": factorial,
        "outcome": outcome,
        "coverage": coverage,
    }  # fmt: skip
    atomic_write_json(out, result)
    print(
        f"postmortem: {sets.n_sets} prediction sets x {n_boot} replicates in {seconds:.1f} s "
        f"with {jobs} process(es), {cpu:.1f} s of CPU (reading and matching "
        f"{sets.cpu_match:.1f} s, replicates {sets.cpu_replicates:.1f} s)"
    )
    for v in layout.variants:
        vd = out_p2[v]["verdict"]
        lo, hi = vd["ci_adjusted"]
        ci = "no interval" if lo is None else f"[{lo:+.4f}, {hi:+.4f}]"
        diff = "n/a" if vd["diff"] is None else f"{vd['diff']:+.4f}"
        print(f"  {v:16s} epoch-1 val mAP drift {diff} {ci} (adjusted): {vd['branch']}")
    return result


def check_coverage(
    values: dict[str, Any], layout: Layout, rule: dict[str, Any], n_images: int, n_boot: int,
    seed: int,
) -> dict[str, Any] | None:
    """The interval's coverage at this run's design (`coverage.interval_coverage`): its seed
    count (the Phase 1 runs in the study design, whose means carry the seed share), its val
    images and replicates, at 95 % and at the rule's adjusted level. None when
    ``pipeline.coverage_trials`` is 0."""
    trials = int((values.get("pipeline") or {}).get("coverage_trials", 0))
    if trials == 0:
        return None
    start = time.perf_counter()
    n_seeds = len(layout.main_runs) if len(layout.main_runs) > 1 else len(layout.seeds)
    levels = [CI_LEVEL, adjusted_level(rule, len(layout.variants))]
    out = interval_coverage(n_seeds, n_images, n_boot, levels, trials, seed)
    return {**out, "seconds": round(time.perf_counter() - start, 3)}


def _value(
    group: Sequence[SetMetrics], idx: np.ndarray, m: str, phase1_of: Sequence[int] | None = None
) -> dict[str, Any]:
    """A metric's value (mean over seeds), its interval, what the interval resamples
    (``levels``), and each seed's value."""
    h = hierarchical_diff(group, None, idx, m, phase1_of=phase1_of)
    return {
        "value": h["diff"],
        "ci": h["ci"],
        "levels": h["levels"],
        "per_seed": [sm.full.get(m) for sm in group],
    }


def _contrast_fields(x: dict[str, Any]) -> dict[str, Any]:
    return {
        "diff": x["diff"],
        "ci": x["ci"],
        "se": x["se"],
        "seed_se": x["seed_se"],
        "image_se": x["image_se"],
        "df": x["df"],
        "n_seeds": x["n_seeds"],
        "levels": x["levels"],
        "n_valid": x["n_valid"],
        "frac_b_gt_a": x["frac_gt_0"],
        "verdict": verdict(x["ci"]),
    }


# ---- the decision rule (params.yaml's postmortem section, declared before the run) ----------

BRANCHES = ("reproduces", "partial", "opposite", "equivalent", "inconclusive")


def rule_of(values: dict[str, Any]) -> dict[str, Any]:
    """The run's decision rule: params.yaml's ``postmortem`` section (its defaults are the
    dataclass's, params.yaml's own values)."""
    given = values.get("postmortem") or {}
    return {**dataclasses.asdict(PostmortemSection()), **given}


def family_size(rule: dict[str, Any], n_hypotheses: int) -> int:
    """H, what the rule divides the error rate by: the hypotheses, with `adjust: bonferroni`."""
    return max(1, n_hypotheses) if rule["adjust"] == "bonferroni" else 1


def adjusted_level(rule: dict[str, Any], n_hypotheses: int) -> float:
    """The confidence of each hypothesis's interval: Bonferroni's 1 - (1 - level) / H, so that
    the H intervals hold together at `level` (simultaneous intervals; Holm's step-down would
    reject a little more but gives no intervals, and the book reports intervals)."""
    return 100.0 - (100.0 - float(rule["level"])) / family_size(rule, n_hypotheses)


def thesis_relative(thesis: dict[str, Any]) -> float:
    """The thesis's epoch-1 drop relative to its Phase 1 (-0.114 / 0.785 = -14.5 %)."""
    return thesis["drop"] / thesis["phase1"]


def within_margin(ci: Sequence[float | None] | None, margin: float) -> bool:
    """Whether an interval lies inside +-`margin`: "no change" in practice (equivalence)."""
    return bool(ci) and ci[0] is not None and -margin <= ci[0] and ci[1] <= margin


def _sign(ci: Sequence[float | None]) -> int:
    if ci[0] is None or ci[1] is None:
        return 0
    return -1 if ci[1] < 0 else 1 if ci[0] > 0 else 0


def judge(
    val: dict[str, Any],
    test: dict[str, Any],
    phase1_val: float | None,
    thesis: dict[str, Any],
    rule: dict[str, Any],
    n_hypotheses: int,
) -> dict[str, Any]:
    """The hypothesis "this variant reproduces the thesis's epoch-1 drop", decided by the
    declared rule from its epoch-1 val mAP drift (`val`, the thesis's measurement) and the
    test drift (`test`), both `hierarchical_diff` results against Phase 1:

    - ``reproduces``: (a) the val interval, adjusted for the H hypotheses, lies below 0; (b)
      the test interval, adjusted alike, lies below 0 too (``test_agrees``); (c) the drop
      relative to Phase 1 reaches ``min_fraction`` of the thesis's relative drop;
    - ``equivalent`` ("no change" in practice): not the above, and the whole adjusted val
      interval lies inside +-``equivalence_margin`` (a significant change that small counts
      as none);
    - ``partial``: (a) and (b) but not (c), beyond the margin: a drop in the thesis's
      direction at a fraction of its size;
    - ``opposite``: (a) and (b) with both intervals above 0, beyond the margin;
    - ``inconclusive``: anything else (an interval too wide to say either, or val and test
      that disagree).
    """
    level = adjusted_level(rule, n_hypotheses)
    ci_val = seed_t_interval(val["diff"], val, level)
    ci_test = seed_t_interval(test["diff"], test, level)
    sign, test_sign = _sign(ci_val), _sign(ci_test)
    test_ok = test_sign == sign if rule["test_agrees"] else True
    diff = val["diff"]
    relative = None if diff is None or not phase1_val else diff / phase1_val
    t_rel = thesis_relative(thesis)
    fraction = None if relative is None else relative / t_rel  # > 0: the thesis's direction
    margin = float(rule["equivalence_margin"])
    within = within_margin(ci_val, margin)
    big_enough = fraction is not None and fraction >= rule["min_fraction"]
    if sign < 0 and test_ok and big_enough:
        branch = "reproduces"
    elif within:  # inside the margin: practically no change, significant or not
        branch = "equivalent"
    elif sign != 0 and test_ok:
        branch = "partial" if sign < 0 else "opposite"
    else:
        branch = "inconclusive"
    p = t_p_value(diff, val)
    why = {
        "reproduces": "the adjusted val and test intervals lie below 0 and the drop reaches "
        f"{rule['min_fraction']:.0%} of the thesis's relative drop",
        "partial": "the adjusted val and test intervals lie below 0, but the drop is under "
        f"{rule['min_fraction']:.0%} of the thesis's relative drop",
        "opposite": "the adjusted val and test intervals lie above 0",
        "equivalent": f"the adjusted val interval lies inside +-{margin:g}",
        "inconclusive": (
            "the adjusted val interval excludes 0 but the test split does not confirm it"
            if sign != 0
            else f"the adjusted val interval contains 0 and reaches beyond +-{margin:g}"
        ),
    }[branch]
    return {
        "branch": branch,
        **{b: branch == b for b in BRANCHES},
        "why": why,
        "metric": "map",
        "split": "val",
        "which": "epoch1",
        "diff": diff,
        "ci": val["ci"],  # the unadjusted 95 % interval
        "ci_adjusted": ci_val,
        "level_adjusted": level,
        "p": p,
        "p_adjusted": None if p is None else min(1.0, p * family_size(rule, n_hypotheses)),
        "excludes_zero": sign != 0,
        "test": {
            "diff": test["diff"],
            "ci_adjusted": ci_test,
            "sign": test_sign,
            "agrees": test_sign == sign and sign != 0,
        },
        "relative": relative,
        # what the rule could see: the drop its adjusted val interval would exclude 0 for in
        # about 80 % of runs with this spread, beside the smallest drop condition (c) accepts
        "detectable_drop": detectable_drop(val, level),
        "reproduce_threshold": (
            None if not phase1_val else rule["min_fraction"] * abs(t_rel) * phase1_val
        ),
        "thesis_relative": t_rel,
        "fraction_of_thesis": fraction,
        "min_fraction": rule["min_fraction"],
        "equivalence_margin": margin,
        "within_margin": bool(within),
        "thesis_drop": thesis["drop"],
        "ratio_to_thesis": None if diff is None else diff / thesis["drop"],
    }


def _vs_adopted(
    v: str, adopted: str, contrasts: list[dict[str, Any]], rule: dict[str, Any], n_hypotheses: int
) -> dict[str, Any] | None:
    """This variant minus the adopted one at epoch 1 on val (paired by seed), with the rule's
    adjusted interval; None for the adopted one."""
    if v == adopted:
        return None
    c = next(
        c for c in contrasts
        if c["a"] == adopted and c["b"] == v and c["metric"] == "map"
        and c["split"] == "val" and c["which"] == "epoch1"
    )  # fmt: skip
    ci = seed_t_interval(c["diff"], c, adjusted_level(rule, n_hypotheses))
    s = _sign(ci)
    return {"diff": c["diff"], "ci_adjusted": ci, "sign": s,
            "verdict": "drop" if s < 0 else "rise" if s > 0 else "inconclusive"}  # fmt: skip


def _mechanism(
    drifts: dict[str, Any],
    group: dict[tuple[str, str], list[SetMetrics]],
    idx: np.ndarray,
    phase1_of: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The epoch-1 drift taken apart (val mAP): the shift before any update (epoch 0 minus
    Phase 1: what the switch does to the very same weights, e.g. another normalisation) and
    the adaptation of the first epoch (epoch 1 minus epoch 0, paired by seed)."""
    shift = drifts["epoch0"]["val"]["map"]
    adapt = hierarchical_diff(
        group["val", "epoch1"], group["val", "epoch0"], idx, "map", phase1_of=phase1_of
    )
    keep = ("diff", "ci", "se", "seed_se", "image_se", "df")
    return {
        "shift_epoch0": {k: shift.get(k) for k in keep},
        "adaptation_epoch1": {k: adapt.get(k) for k in keep},
        "drift_epoch1": {k: drifts["epoch1"]["val"]["map"].get(k) for k in keep},
    }


def _outcome(p2: dict[str, Any], adopted: str) -> dict[str, Any]:
    """What the book can conclude: the hypotheses in each branch of the rule, and whether the
    thesis's drop is explained. It is only by a hypothesis that reproduces it: a control,
    when the adopted recipe does not; when the adopted recipe reproduces it itself, a
    control that removes it (above the adopted recipe at epoch 1, adjusted interval, and no
    drop of its own against Phase 1)."""
    others = [v for v in p2 if v != adopted]
    by = {b: [v for v in others if p2[v]["verdict"]["branch"] == b] for b in BRANCHES}
    adopted_branch = p2[adopted]["verdict"]["branch"]
    adopted_drop = adopted_branch in ("reproduces", "partial")
    removing = [
        v for v in others
        if adopted_drop and (p2[v]["verdict"]["vs_adopted"] or {}).get("verdict") == "rise"
        and p2[v]["verdict"]["branch"] in ("equivalent", "opposite")
    ]  # fmt: skip
    adopted_reproduces = adopted_branch == "reproduces"
    explained = bool(removing) if adopted_reproduces else bool(by["reproduces"])
    return {
        "adopted_branch": adopted_branch,
        "adopted_drop": adopted_drop,
        "adopted_reproduces": adopted_reproduces,
        "adopted_partial": adopted_branch == "partial",
        **{f"{b}_variants": vs for b, vs in by.items()},
        **{f"n_{b}": len(vs) for b, vs in by.items()},
        # a drop in the thesis's direction below its size, the adopted recipe's included
        "any_partial": bool(by["partial"]) or adopted_branch == "partial",
        "removing_variants": removing,
        "n_removing": len(removing),
        "explained": explained,
        "no_drop": not by["reproduces"] and not by["partial"] and not adopted_drop,
        "open": not explained,
    }


# ---- effects named for the difference they measure ----------------------------------------

# name -> (B, A): the effect is B - A. "phase1" is the Phase 1 model.
EFFECTS: dict[str, tuple[str, str]] = {
    "text": ("zero_start", "frozen0"),  # the text branch: the gate learned vs held at 0
    "loss_switch": ("zero_start", "deimv2_loss"),  # focal loss vs Phase 1's MAL
    "head_finetuning": ("frozen0", "phase1"),  # Phase 2's training without text vs Phase 1
}
EFFECT_SETS = (("best", "test"), ("epoch1", "val"), ("final", "val"))
EFFECT_METRICS = ("map", "critical_recall", "op_recall_critical")


def named_effects(
    p2: dict[str, dict[tuple[str, str], list[SetMetrics]]],
    phase1: dict[str, list[SetMetrics]],
    idx: np.ndarray,
    metrics: Sequence[str],
    phase1_of: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Each effect of `EFFECTS` whose variants the run has: ``{name: {"b", "a",
    which: {split: {metric: hierarchical_diff}}}}``. Zero_start - Phase 1 is none of them: it
    holds the text, the heads' fine-tuning and the loss switch at once."""
    out: dict[str, Any] = {}
    for name, (b, a) in EFFECTS.items():
        if b not in p2 or (a != "phase1" and a not in p2):
            continue
        entry: dict[str, Any] = {"b": b, "a": a}
        for which, split in EFFECT_SETS:
            group_b = p2[b][split, which]
            group_a = phase1[split] if a == "phase1" else p2[a][split, which]
            entry.setdefault(which, {})[split] = {
                m: hierarchical_diff(group_b, group_a, idx, m, phase1_of=phase1_of)
                for m in EFFECT_METRICS
                if m in metrics
            }
        out[name] = entry
    return out


# The thesis replica's three switches, each at two levels (the first: the adopted recipe's).
FACTORS: dict[str, tuple[str, tuple[Any, Any]]] = {
    "start": ("fusion.start", ("ema", "raw")),
    "bn": ("fusion.bn", ("eval", "train")),
    "normalize": ("data.normalize", ("imagenet", "clip")),
}


def factorial_cells(values: dict[str, Any], variants: Sequence[str]) -> dict[tuple[int, ...], str]:
    """The variants that are cells of the 2^3 factorial over `FACTORS` (their switches touch
    only those keys, at those levels): ``{(start, bn, normalize) as 0/1: variant}``."""
    switches = (values.get("pipeline") or {}).get("variant_switches") or {}
    keys = {k: levels for k, levels in FACTORS.values()}
    cells: dict[tuple[int, ...], str] = {}
    for v in variants:
        sw = switches.get(v, {} if v == ADOPTED_VARIANT else None)
        if sw is None or any(k not in keys or val not in keys[k] for k, val in sw.items()):
            continue
        cell = tuple(levels.index(sw.get(k, levels[0])) for k, levels in FACTORS.values())
        cells.setdefault(cell, v)
    return cells


def factorial_effects(
    p2: dict[str, dict[tuple[str, str], list[SetMetrics]]],
    values: dict[str, Any],
    idx: np.ndarray,
    phase1_of: Sequence[int] | None = None,
) -> dict[str, Any] | None:
    """Main effects and interactions of the replica's switches on val mAP (the epoch-0
    shift, the epoch-1 value), when the run has all eight cells; None otherwise. An effect
    is the mean over the cells at a factor's second level minus the mean at its first (for
    an interaction, the product of the signs), paired by seed: weights +-1/4."""
    cells = factorial_cells(values, list(p2))
    if len(cells) < 8:
        return None
    names = list(FACTORS)
    terms = [(i,) for i in range(3)] + [(0, 1), (0, 2), (1, 2), (0, 1, 2)]
    order = sorted(cells)
    out: dict[str, Any] = {"cells": {cells[c]: dict(zip(names, c, strict=True)) for c in order}}
    for which in ("epoch0", "epoch1"):
        groups = [p2[cells[c]]["val", which] for c in order]
        block = {}
        for term in terms:
            w = [float(np.prod([1 if c[i] else -1 for i in term])) / 4 for c in order]
            label = "_".join(names[i] for i in term)  # e.g. start_bn: an interaction
            block[label] = linear_combination(groups, w, idx, "map", phase1_of=phase1_of)
        out[which] = block
    return out


def _history_check(layout: Layout, v: str, vals: dict[str, Any]) -> dict[str, Any]:
    """history.jsonl's epoch-1 val mAP (the trainer's evaluation) beside the recomputed one."""
    epoch1, final = [], []
    for s in layout.seeds:
        rows = _history(layout.phase2(v, s, "history.jsonl"))
        row1 = next((r for r in rows if r.get("epoch") == 1), {})
        epoch1.append(row1.get("val_map"))
        final.append(max((int(r["epoch"]) for r in rows if "epoch" in r), default=None))
    recomputed = vals["epoch1"]["val"]["map"]["per_seed"]
    diffs = [abs(a - b) for a, b in zip(epoch1, recomputed, strict=True) if None not in (a, b)]
    return {
        "epoch1_val_map": epoch1,
        "final_epoch": final,
        "max_abs_diff_epoch1": max(diffs) if diffs else None,
    }
