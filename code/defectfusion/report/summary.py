"""``results/summary.json``: every number the thesis book quotes, read from the results.

The book reads only this file, the tables and the figures, so this schema is a contract
(keys always present; ``null`` where the run has nothing to measure)::

    {"run": {"commit":          git commit of the code ("-dirty": tracked files changed),
             "params_sha256":   sha256 of the whole merged config (params + profile),
             "date":            UTC time of the newest results file read (ISO 8601): when
                                the results were finished, not when this file was written
             "machine":         OS, architecture, CPU count and GPU(s) of the report machine
             "profile":         the profile overlays ("micro", "thesis"...), "default" if none,
             "profile_es":      the same as the prose says it ("por defecto"),
             "phase1_lr", "phase2_lr", "lr_fraction" (Phase 2's over Phase 1's),
             "phase2_epochs"},
     "reproduce": {"command": the snakemake command of this profile, "data_seed": the data
                   generator's seed, "dvc_remote": the remote's URL, "wall_seconds",
                   "wall_minutes": the run on the clock (null: unknown), "wall_known",
                   "wall_es": the same as the book's table prints it, "jobs_seconds": the
                   jobs' times summed, "jobs_exceed_wall": whether that sum is the larger},
     "dataset": {"name":        the dataset's info.dataset, "synthetic": made by data/synth.py,
                 "classes":     class names in id order, "n_classes": how many,
                 "critical_classes": names of data.critical_classes,
                 "n_images":    {split: images}, "n_boxes": {split: boxes}},
     "main_preset": the Phase 1 preset Phase 2 builds on (model.preset),
     "phase1": {preset: {"map", "map50", "map75", "critical_recall", "critical_recall50",
                         "composite":        test metrics (evaluate's metrics file),
                         "parameters":       parameter count (null: older metrics files),
                         "best_epoch":       epoch of best.pt (selected on val),
                         "train_seconds":    training time, the sum of history's per-epoch
                                             "seconds" (validation excluded),
                         "plateau": {"gain", "from_epoch", "to_epoch", "min_gain", "reached",
                                     "judged" (false: too few epochs, gain and reached null)}:
                                             val mAP gain over the last epochs, as the log's
                                             "plateau reached/NOT reached" line,
                         "per_class": {name: {"ap", "recall"}} (test)}},
     "phase2": {variant: {"seeds": [...], "n_seeds": how many,
                          "map", "map50", "critical_recall", "critical_recall50",
                          "composite":       test metrics, mean over seeds,
                          "trainable_parameters": the parameters Phase 2 trained (from the
                                             checkpoint through evaluate's metrics file),
                          "epoch0_val_map":  val mAP before any update, mean over seeds,
                          "epoch1_val_map":  val mAP after epoch 1 (null: not evaluated),
                          "best_epoch":      epoch of best.pt (median over seeds, the lower),
                          "val_map_by_epoch": [val mAP at epoch 0, 1, ...], mean over the
                                             seeds that reached the epoch (null where none),
                          "loss_change":     training loss, last epoch / first - 1, mean
                                             over seeds (how far Phase 2 moved the model),
                          "alpha_final", "tau_final": the gate and temperature after the
                                             last training step, mean over seeds,
                          "alpha_by_seed_es", "alpha_signs_agree": each seed's gate,
                          "alpha_best_by_seed_es": each seed's gate in the checkpoint
                                             evaluated on test (val-selected epoch),
                          "max_correction":  max over seeds of |alpha| / tau, the most the text
                                             branch can add to a logit (|S| <= 1 / tau),
                          "diff_map", "diff_critical_recall": test B - A, B this variant
                                             (val-selected checkpoint), A the main Phase 1
                                             model, mean over seeds,
                          "ci_map", "ci_critical_recall": its 95% CI [lo, hi], hierarchical
                                             bootstrap over seeds and test images
                                             (results/postmortem.json; what it covers:
                                             postmortem.covers.vs_phase1),
                          "frac_b_gt_a_map": fraction of bootstrap replicates with B > A
                                             in mAP,
                          "drift":           {"epoch1"|"final": {"val"|"test": {metric:
                                             {"diff", "ci", "n_seeds", "verdict", ...}}},
                                             "best": {"test": ...}}: the checkpoint minus
                                             Phase 1 on the same images (postmortem.json),
                          "verdict":         the hypothesis "this variant reproduces the
                                             epoch-1 drop": {"outcome": drop|rise|no_change,
                                             "drop", "rise", "no_change" (booleans), "diff",
                                             "ci", "thesis_drop", "ratio_to_thesis", "test",
                                             "final", "vs_adopted"},
                          "vs_adopted":      (not for the adopted variant) this variant minus
                                             the adopted one, paired by seed: {which: {split:
                                             {metric: {"diff", "ci", "verdict", ...}}}},
                          "operating_point": test recall of each critical class (and their
                                             mean, "critical") at score >= eval.score_threshold
                                             and IoU eval.iou_match, val-selected checkpoint:
                                             {key: {"value", "ci"}}, plus "tp_score_mean"}},
     "contrasts": [{"a", "b", "metric", "split", "which", "diff", "ci", "n_seeds", "verdict",
                    "covers", ...}]: every variant against Phase 1 and against the adopted one,
     "postmortem": {"adopted", "n_seeds", "n_phase1", "n_seeds_each", "n_boot", "ci_level", "seconds", "covers", "thesis",
                    "operating_point", "outcome": {"adopted_drop", "n_drop", "drop_variants",
                    "explained", "no_drop", "open", ...}, "phase1": {"operating_point",
                    "tp_score_mean"}} (``postmortem_summary``),
     "phase1_val_map_best": the main preset's val mAP at its best epoch,
     "phase1_equal_epochs": whether every Phase 1 preset was given the same number of epochs
                            (its budget; early stopping may end one sooner: "epochs"),
     "epoch0_equals_phase1": whether every seed of zero_start, before any update, has exactly
                             the val metrics of Phase 1's best epoch (null: no zero_start),
     "confusion": {"phase1", "phase2": {"fraction": row-normalised test confusion matrix,
                   rows and columns by class id then background; "boxes": each row's boxes}}
                   (``confusion_summary``),
     "qualitative": how many test images figure qualitative can choose from per direction
                    (``qualitative_summary``),
     "similarity": the class prompts' cosine similarities as the book reads them
                   (``similarity_summary``),
     "phase1_top": the backbone with the highest test mAP and whether the main one is
                   pretrained (``_phase1_top``),
     and under "postmortem", "late": the last epoch's significant val falls against Phase 1,
     each beside its epoch-0 part (``_late_drift``)}
"""

from __future__ import annotations

import copy
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from defectfusion.config import TrainSection
from defectfusion.core.errors import UserError
from defectfusion.core.fsutil import atomic_write_json
from defectfusion.core.jsonio import (  # noqa: F401 (read_jsonl re-exported: S.read_jsonl)
    load_json,
    parse_json,
    read_jsonl,
)
from defectfusion.data.coco import category_names
from defectfusion.evaluation.metrics import pooled_cases
from defectfusion.report import (
    ADOPTED_VARIANT,
    METRIC_NAMES_ES,
    PARAM_SECTIONS,
    SPLIT_NAMES,
    Layout,
    backbone_name_es,
    class_name_es,
    inputs_of,
    number_es,
    preset_setting,
    variant_name_es,
)
from defectfusion.report import provenance as prov
from defectfusion.train.schedule import plateau_gain

TEST_KEYS = ("map", "map50", "map75", "critical_recall", "critical_recall50", "composite")


# ---- readers ---------------------------------------------------------------------------------


def best_row(history: list[dict[str, Any]], where: str = "history") -> dict[str, Any]:
    """The row of the epoch best.pt holds: the last one flagged ``best``. Epoch 0 never is
    (the trainer logs it but never selects it), so a history without one is an error."""
    flagged = [r for r in history if r.get("best")]
    if flagged:
        return flagged[-1]
    raise UserError(f"{where}: no epoch marked best (the run did not finish an evaluated epoch)")


def epoch_row(history: list[dict[str, Any]], epoch: int) -> dict[str, Any] | None:
    return next((r for r in history if r.get("epoch") == epoch), None)


def class_order(metrics: dict[str, Any]) -> list[str]:
    """Class names of a metrics file in id order (the file's keys are sorted by name)."""
    return sorted(metrics["per_class"], key=lambda n: metrics["per_class"][n]["id"])


def mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


# ---- dataset ---------------------------------------------------------------------------------


def dataset_counts(layout: Layout) -> dict[str, Any]:
    """Names, and per split: images, boxes, and per class images-with-the-class and boxes."""
    out: dict[str, Any] = {"splits": {}}
    for split in SPLIT_NAMES:
        path = layout.split(split)
        gt = load_json(path)
        names = category_names(gt)
        if "classes" in out and names != out["classes"]:
            raise UserError(f"{path}: classes {names} differ from the train split's")
        out["classes"] = names
        out.setdefault("name", (gt.get("info") or {}).get("dataset", Path(layout.data_dir).name))
        by_id = {c["id"]: c["name"] for c in gt["categories"]}
        boxes = dict.fromkeys(names, 0)
        images: dict[str, set[int]] = {n: set() for n in names}
        for ann in gt["annotations"]:
            name = by_id[ann["category_id"]]
            boxes[name] += 1
            images[name].add(ann["image_id"])
        out["splits"][split] = {
            "n_images": len(gt["images"]),
            "n_boxes": len(gt["annotations"]),
            "images": {n: len(v) for n, v in images.items()},
            "boxes": boxes,
        }
    return out


def critical_names(classes: Sequence[str], critical_ids: Sequence[int], where: str) -> list[str]:
    for c in critical_ids:
        if not 0 <= c < len(classes):
            raise UserError(
                f"{where}: critical class id {c} is not in the dataset (0..{len(classes) - 1})"
            )
    return [classes[c] for c in critical_ids]


# ---- Phase 1 ---------------------------------------------------------------------------------


def plateau(history: list[dict[str, Any]], phase1: dict[str, Any]) -> dict[str, Any]:
    """Whether Phase 1 reached its plateau, as its training log said (``phase1.plateau_*``;
    a setting the config lacks takes the one default, the config dataclass's)."""
    default = TrainSection()
    fraction = float(phase1.get("plateau_fraction", default.plateau_fraction))
    min_gain = float(phase1.get("plateau_min_gain", default.plateau_min_gain))
    p = plateau_gain(history, fraction) if fraction > 0 else {"gain": None}
    reached = None if p["gain"] is None else bool(p["gain"] < min_gain)
    # judged: enough epochs to measure a gain (a one-epoch Phase 1 has none; reached: null)
    return {**p, "min_gain": min_gain, "reached": reached, "judged": reached is not None}


def phase1_budgets(values: dict[str, Any], presets: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Each preset's Phase 1 budget as configured, whatever early stopping did: the schedule's
    epochs and the most it may run holding the minimum lr until its plateau (phase1.max_epochs;
    the schedule's epochs when it does not extend)."""
    out = {}
    for p in presets:
        epochs = int(preset_setting(values, p, "phase1.epochs"))
        extra = preset_setting(values, p, "phase1.max_epochs") or 0
        out[p] = (epochs, max(epochs, int(extra)))
    return out


def phase1_entry(
    layout: Layout, preset: str, phase1: dict[str, Any] | None = None
) -> dict[str, Any]:
    path = layout.phase1(preset, "history.jsonl")
    history = read_jsonl(path)
    m = load_json(layout.phase1(preset, "test_metrics.json"))
    return {
        "plateau": plateau(history, phase1 or {}),
        **{k: m.get(k) for k in TEST_KEYS},
        "parameters": m.get("parameters"),
        "best_epoch": int(best_row(history, path)["epoch"]),
        "epochs": max(int(r["epoch"]) for r in history),
        "train_seconds": round(sum(float(r.get("seconds", 0.0)) for r in history), 3),
        "per_class": {
            name: {"ap": pc.get("ap"), "recall": pc.get("recall")}
            for name, pc in m["per_class"].items()
        },
    }


def read_benchmark(path: Path) -> dict[str, float | None] | None:
    """A Snakemake benchmark file (TSV, one job): its wall seconds ``s``, peak memory
    ``max_rss`` (MiB) and ``cpu_time``; None without the file or its row, a value None when
    the file lacks it."""
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) < 2:
        return None
    row = dict(zip(lines[0].split("\t"), lines[1].split("\t"), strict=False))
    out: dict[str, float | None] = {}
    for key in ("s", "max_rss", "cpu_time"):
        try:
            out[key] = float(row[key])
        except (KeyError, ValueError):
            out[key] = None
    return out


def eval_ms_per_image(layout: Layout, preset: str) -> float | None:
    """Wall time of the evaluate job (start-up and model loading included) per test image,
    from Snakemake's benchmark file; None without one."""
    bench = read_benchmark(Path(layout.eval_benchmark(preset)))
    if bench is None or bench["s"] is None:
        return None
    n = load_json(layout.phase1(preset, "test_metrics.json"))["n_images"]
    return 1000.0 * bench["s"] / max(1, n)


# ---- Phase 2 ---------------------------------------------------------------------------------


def phase2_runs(layout: Layout, variant: str) -> list[dict[str, Any]]:
    """Per seed: history, last step, test metrics and the comparison with Phase 1."""
    runs = []
    for seed in layout.seeds:
        hpath = layout.phase2(variant, seed, "history.jsonl")
        history = read_jsonl(hpath)
        if epoch_row(history, 0) is None:
            raise UserError(f"{hpath}: no epoch-0 row (the evaluation before any update)")
        steps = read_jsonl(layout.phase2(variant, seed, "steps.jsonl"))
        runs.append(
            {
                "seed": seed,
                "history": history,
                "best": best_row(history, hpath),
                "last": steps[-1] if steps else epoch_row(history, 0),
                "test": load_json(layout.phase2(variant, seed, "test_metrics.json")),
            }
        )
    return runs


def _loss_change(history: list[dict[str, Any]]) -> float | None:
    """last / first - 1 of the training loss over the epochs that trained (epoch 0 only
    evaluates): how far a run moved the model, by its own objective."""
    losses = [r["loss"] for r in sorted(history, key=lambda r: r["epoch"]) if r.get("loss")]
    return losses[-1] / losses[0] - 1 if len(losses) >= 2 else None


def ci_envelope(cis: list[list[float | None]]) -> list[float | None]:
    """One seed: its interval. Several: [min lo, max hi], covering every seed's interval.
    Not a confidence interval (no longer used: the summary takes the hierarchical one)."""
    los = [c[0] for c in cis if c[0] is not None]
    his = [c[1] for c in cis if c[1] is not None]
    return [min(los) if los else None, max(his) if his else None]


def _gate_by_seed(runs: list[dict[str, Any]], row: str = "last") -> dict[str, Any]:
    """The gate seed by seed, after the last step (`row` "last") or in the val-selected
    checkpoint ("best"): the values as the book prints them ("+0.0163, +0.0161 y −0.0161"),
    whether their signs agree, and the most the text branch adds to a logit in any seed,
    max |alpha| max|S| = max |alpha| / tau."""
    pairs = [
        (float(run[row]["alpha"]), float(run[row]["tau"]))
        for run in runs
        if run[row].get("alpha") is not None and run[row].get("tau")
    ]
    if not pairs:
        return {"alpha_by_seed_es": None, "alpha_signs_agree": None, "max_correction": None}
    texts = [number_es(a, "+.4f") for a, _ in pairs]
    signs = {(a > 0) - (a < 0) for a, _ in pairs}
    return {
        "alpha_by_seed_es": texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " y " + texts[-1],
        "alpha_signs_agree": len(signs) == 1 and 0 not in signs,
        "max_correction": max(abs(a) / t for a, t in pairs),
    }


def phase2_entry(layout: Layout, variant: str, pm: dict[str, Any]) -> dict[str, Any]:
    runs = phase2_runs(layout, variant)
    last_epoch = max(int(r["epoch"]) for run in runs for r in run["history"])
    by_epoch = [
        mean((epoch_row(run["history"], e) or {}).get("val_map") for run in runs)
        for e in range(last_epoch + 1)
    ]

    def cmp(metric: str) -> dict[str, Any]:
        # the val-selected checkpoint on test against Phase 1, over seeds and images
        return pm["phase2"][variant]["drift"]["best"]["test"][metric]

    return {
        "seeds": [run["seed"] for run in runs],
        "n_seeds": len(runs),
        **{k: mean(run["test"].get(k) for run in runs) for k in TEST_KEYS},
        # what Phase 2 trained (the thesis: about 140,000); null from an older metrics file
        "trainable_parameters": runs[0]["test"].get("trainable_parameters"),
        "epoch0_val_map": mean(epoch_row(run["history"], 0)["val_map"] for run in runs),
        "epoch1_val_map": mean((epoch_row(run["history"], 1) or {}).get("val_map") for run in runs),
        "best_epoch": int(statistics.median_low(int(run["best"]["epoch"]) for run in runs)),
        "val_map_by_epoch": by_epoch,
        # how much Phase 2 moved: its training loss from the first epoch to the last
        "loss_change": mean(_loss_change(run["history"]) for run in runs),
        "alpha_final": mean(run["last"].get("alpha") for run in runs),
        "tau_final": mean(run["last"].get("tau") for run in runs),
        # per seed: the seeds' gates may open in opposite senses, which their mean hides
        **_gate_by_seed(runs),
        # the gate the test metrics were measured with: the val-selected epoch's, not the last
        "alpha_best_by_seed_es": _gate_by_seed(runs, "best")["alpha_by_seed_es"],
        "diff_map": cmp("map")["diff"],
        "ci_map": cmp("map")["ci"],
        "diff_critical_recall": cmp("critical_recall")["diff"],
        "ci_critical_recall": cmp("critical_recall")["ci"],
        "frac_b_gt_a_map": cmp("map")["frac_gt_0"],
        **postmortem_entry(pm, variant),
    }


def val_metrics(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k.startswith("val_")}


# ---- run -------------------------------------------------------------------------------------


def machine() -> str:
    parts = [f"{platform.system()} {platform.machine()}", f"{os.cpu_count()} CPUs"]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            gpus = [g.strip() for g in out.stdout.splitlines() if g.strip()]
            if gpus:
                parts.append(", ".join(gpus))
        except (OSError, subprocess.TimeoutExpired):
            pass
    return ", ".join(parts)


def profile_name(values: dict[str, Any]) -> str:
    pipe = values.get("pipeline") or {}
    # `pipeline use-profile` writes the profile into params.yaml and names it there
    overlays = [*([pipe["profile"]] if pipe.get("profile") else []), *(pipe.get("overlays") or [])]
    return "+".join(dict.fromkeys(Path(o).stem for o in overlays)) or "default"


def results_date(paths: Iterable[str]) -> str:
    newest = max(Path(p).stat().st_mtime for p in paths)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(newest))


def _phase1_top(
    phase1: dict[str, Any], values: dict[str, Any], main: str
) -> dict[str, Any]:
    """The Phase 1 preset with the highest test mAP beside the main one, in the tables'
    Spanish names, and whether the main backbone is pretrained (``model.init``)."""
    scored = {p: e["map"] for p, e in phase1.items() if e.get("map") is not None}
    top = max(scored, key=lambda p: (scored[p], p == main)) if scored else main
    return {
        "name_es": backbone_name_es(top, values),
        "map": scored.get(top),
        "main_name_es": backbone_name_es(main, values),
        "main_map": scored.get(main),
        "main_is_top": top == main,
        "main_pretrained": preset_setting(values, main, "model.init") != "scratch",
    }


def build_summary(values: dict[str, Any], layout: Layout) -> dict[str, Any]:
    """The summary of the module docstring, from config dict `values` (``Config.to_dict()``)."""
    ds = dataset_counts(layout)
    critical = critical_names(
        ds["classes"], values["data"]["critical_classes"], "config data.critical_classes"
    )
    phase1 = {p: phase1_entry(layout, p, values["phase1"]) for p in layout.presets}
    pm = load_json(layout.postmortem)
    phase2 = {v: phase2_entry(layout, v, pm) for v in layout.variants}

    main_history = read_jsonl(layout.phase1(layout.main, "history.jsonl"))
    main_best = best_row(main_history, layout.phase1(layout.main, "history.jsonl"))
    equal: bool | None = None
    if ADOPTED_VARIANT in layout.variants:  # the zero-start: epoch 0 is Phase 1 itself
        target = val_metrics(main_best)
        equal = all(
            val_metrics(epoch_row(run["history"], 0)) == target
            for run in phase2_runs(layout, ADOPTED_VARIANT)
        )
    return {
        "run": {
            "commit": prov.git_commit(),
            "params_sha256": prov.sha256_json(values),
            "date": results_date(inputs_of(layout, "summary", "summary")),
            "machine": machine(),
            "profile": (profile := profile_name(values)),
            "profile_es": "por defecto" if profile == "default" else profile,  # for the prose
            # Phase 2's schedule beside Phase 1's lr: the book says why the fraction differs
            "phase1_lr": float(values["phase1"]["lr"]),
            "phase2_lr": float(values["phase2"]["lr"]),
            "lr_fraction": float(values["phase2"]["lr"]) / float(values["phase1"]["lr"]),
            "phase2_epochs": int(values["phase2"]["epochs"]),
        },
        "reproduce": reproduce_info(values, layout),
        "dataset": {
            "name": ds["name"],
            "classes": ds["classes"],
            "n_classes": len(ds["classes"]),
            # made by data/synth.py (the book says "synthetic" only of such a dataset)
            "synthetic": values["pipeline"]["dataset"]["kind"] == "synth",
            "critical_classes": critical,
            "n_images": {s: ds["splits"][s]["n_images"] for s in SPLIT_NAMES},
            "n_boxes": {s: ds["splits"][s]["n_boxes"] for s in SPLIT_NAMES},
        },
        "main_preset": layout.main,
        "phase1": phase1,
        "phase2": phase2,
        "phase1_val_map_best": main_best.get("val_map"),
        # the backbones trained the same number of epochs (the book may compare them then)
        "phase1_equal_epochs": len(set(phase1_budgets(values, layout.presets).values())) == 1,
        # which backbone scored highest on test (one run each, no interval: a direction, not
        # a ranking), and whether the main one started from pretrained weights
        "phase1_top": _phase1_top(phase1, values, layout.main),
        "epoch0_equals_phase1": equal,
        # every variant params.yaml defines -> whether this run trained it (a profile may run a
        # subset): the book's paragraph on a hypothesis appears only when it was measured
        "variants_run": {
            v: v in layout.variants
            for v in sorted(
                {*(values.get("pipeline") or {}).get("variant_switches", {}), *layout.variants}
            )
        },
        **(confusion := confusion_summary(layout)),  # issue 14: the confusion figure, read
        "qualitative": qualitative_summary(layout, values),  # how many cases Fig. qualitative has
        # what Fig. prompt_similarity shows, beside the pair Phase 1 confuses most
        "similarity": similarity_summary(layout, values, confusion["confusion"]["phase1"]),
        **postmortem_summary(pm),  # issue 13: drifts, contrasts and verdicts
    }


# ---- issue 14: the confusion matrices the book discusses (figure "confusion") ---------------


def similarity_summary(
    layout: Layout, values: dict[str, Any], phase1_confusion: dict[str, Any]
) -> dict[str, Any]:
    """The class prompts' cosine similarities (results/text/embeddings.json) as the book
    reads them: the most alike pair of all and of the critical classes, the range off the
    diagonal, and the similarity of the critical pair Phase 1 confuses most
    (`phase1_confusion`: ``confusion_summary``'s Phase 1 entry). The more alike two prompts,
    the less the text can tell those classes apart."""
    data = load_json(layout.text)
    names, cos = data["class_names"], data["cosine"]
    critical = set(values["data"]["critical_classes"])
    pairs = [(cos[i][j], i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    if not pairs:
        return {"any": False}
    crit = [p for p in pairs if p[1] in critical and p[2] in critical] or pairs

    def pair_es(p: tuple[float, int, int]) -> str:
        return f"{class_name_es(names[p[1]])}–{class_name_es(names[p[2]])}"

    top, top_crit = max(pairs), max(crit)
    # the critical pair Phase 1 confuses most (share of the first's test boxes taken for the
    # second): the confusion the text was meant to resolve, and how alike its prompts are
    fraction, boxes = phase1_confusion["fraction"], phase1_confusion["boxes"]
    shares = [
        (fraction[i][j], i, j)
        for i in critical for j in critical
        if i != j and i < len(fraction) and boxes[i]
    ]  # fmt: skip
    confused = max(shares) if shares else None
    return {
        "confused_any": confused is not None and confused[0] > 0,
        "confused_pair_es": confused and pair_es(confused),
        "confused_share": confused and confused[0],
        "confused_similarity": confused and cos[confused[1]][confused[2]],
        "any": True,
        "max": top[0], "max_pair_es": pair_es(top),
        "min": min(pairs)[0],
        "critical_max": top_crit[0], "critical_max_pair_es": pair_es(top_crit),
        "critical_is_max": top_crit[1:] == top[1:],
    }  # fmt: skip


def qualitative_summary(layout: Layout, values: dict[str, Any]) -> dict[str, Any]:
    """How many test images the ``qualitative`` figure can choose from in each direction
    (``metrics.pooled_cases`` over the adopted variant's seeds: Phase 2 finds a critical box
    Phase 1 misses, and the reverse), so the book says what it shows, or that there is
    nothing to show."""

    if not layout.variants:
        return {"b_not_a": 0, "a_not_b": 0, "any": False, "n_seeds": 0}
    phase1, *phase2 = (load_json(p) for p in layout.qualitative_predictions())
    cases = pooled_cases(
        load_json(layout.split("test")), phase1, dict(zip(layout.seeds, phase2, strict=True)),
        values["data"]["critical_classes"], values["eval"]["score_threshold"], top=None,
    )  # fmt: skip
    n = {k: len(v) for k, v in cases.items()}
    return {**n, "any": any(n.values()), "n_seeds": len(phase2)}



def confusion_summary(layout: Layout) -> dict[str, Any]:
    """``{"confusion": {"phase1": {"fraction": M, "boxes": n}, "phase2": ...}}``: each model's
    test confusion matrix, row-normalised (rows and columns by class id, then background;
    each row over its sum, zeros for an empty row) and the boxes of each row, so the book can
    quote e.g. the share of scratches taken for fractures, ``confusion.phase1.fraction.3.2``.
    Phase 2 is the adopted variant's first seed."""

    def read(path: str) -> dict[str, Any]:
        matrix = load_json(path)["confusion"]["matrix"]
        return {
            "fraction": [[c / sum(r) if sum(r) else 0.0 for c in r] for r in matrix],
            "boxes": [int(sum(r)) for r in matrix],
        }

    out = {"phase1": read(layout.phase1(layout.main, "test_metrics.json"))}
    if layout.variants:
        v, s = layout.adopted
        out["phase2"] = read(layout.phase2(v, s, "test_metrics.json"))
    return {"confusion": out}


# ---- issue 13: the post-mortem (results/postmortem.json, defectfusion.analysis.postmortem) ----------


def _operating_point(values: dict[str, Any], cal: dict[str, Any] | None) -> dict[str, Any]:
    """Recall per critical class at the operating point, from a postmortem "values" block
    (``{metric: {"value", "ci", ...}}``) of the test split."""
    out = {
        k[len("op_recall_") :]: {"value": v["value"], "ci": v["ci"]}
        for k, v in values.items()
        if k.startswith("op_recall_")
    }
    out["tp_score_mean"] = None if cal is None else cal.get("tp_score_mean")
    return out


def postmortem_entry(pm: dict[str, Any], variant: str) -> dict[str, Any]:
    """A variant's ``drift``, ``verdict`` (the rule's branch, with its Spanish words:
    ``verdict.texto``), ``mechanism``, ``vs_adopted`` and ``operating_point``."""
    entry = pm["phase2"][variant]
    cal = pm["calibration"]["phase2"][variant]["best"]["test"]
    out = {
        "drift": entry["drift"],
        "verdict": {**entry["verdict"], "texto": verdict_words_es(entry["verdict"])},
        "mechanism": entry["mechanism"],
        "operating_point": _operating_point(entry["values"]["best"]["test"], cal),
    }
    if variant != pm["adopted"]:
        vs: dict[str, Any] = {}
        for c in pm["contrasts"]:
            if c["a"] == pm["adopted"] and c["b"] == variant:
                keep = {
                    k: v for k, v in c.items() if k not in ("a", "b", "metric", "split", "which")
                }
                vs.setdefault(c["which"], {}).setdefault(c["split"], {})[c["metric"]] = keep
        out["vs_adopted"] = vs
    return out


# ---- the rule's words (Spanish: the book prints them as they are) --------------------------


def _ci_es(ci: list[float | None]) -> str:
    return f"[{number_es(ci[0], '+.4f')}, {number_es(ci[1], '+.4f')}]"  # type: ignore[arg-type]


def verdict_words_es(vd: dict[str, Any]) -> str:
    """The sentence the book prints for a hypothesis: its branch of the declared rule and the
    numbers that decided it (postmortem.judge). It completes "Esta hipótesis ..."."""
    b = vd["branch"]
    if vd["diff"] is None:
        return "no se puede juzgar: esta ejecución no tiene deriva medida en la época 1."
    level = number_es(vd["level_adjusted"], ".2f")
    val = f"{number_es(vd['diff'], '+.4f')}; IC ajustado al {level}\u202f%: {_ci_es(vd['ci_adjusted'])}"
    t = vd["test"]
    test = f"{number_es(t['diff'], '+.4f')}; IC ajustado: {_ci_es(t['ci_adjusted'])}"
    frac = number_es(vd["fraction_of_thesis"], ".0%")
    need = number_es(vd["min_fraction"], ".0%")
    margin = number_es(vd["equivalence_margin"], ".3f")
    if b == "reproduces":
        return (
            f"reproduce la caída de la tesis: en validación, la mAP cambia en la época 1 "
            f"({val}), el {frac} de la caída relativa de la tesis (la regla exige al menos el "
            f"{need}), y la partición de prueba lo confirma ({test})."
        )
    if b == "partial":
        return (
            f"baja la mAP en la dirección de la tesis, pero solo al {frac} de su tamaño "
            f"relativo: en validación, la mAP cambia en la época 1 ({val}) y la partición de "
            f"prueba lo confirma ({test}), pero la caída no llega al {need} de la caída de la tesis, "
            "el mínimo que la regla exige para decir que la reproduce."
        )
    if b == "opposite":
        return (
            f"va en contra de la tesis: en validación, la mAP sube en la época 1 ({val}), y la "
            f"partición de prueba lo confirma ({test})."
        )
    if b == "equivalent":
        return (
            f"no mueve la mAP a efectos prácticos: su cambio en la época 1 ({val}) cabe entero "
            f"en el margen de equivalencia de ±{margin}."
        )
    if vd["excludes_zero"]:
        return (
            f"no es concluyente: en validación, la mAP cambia en la época 1 ({val}), pero la "
            f"partición de prueba no lo confirma ({test})."
        )
    return (
        f"no es concluyente: en validación, el cambio de la mAP en la época 1 ({val}) "
        f"contiene el cero y sale del margen de equivalencia de ±{margin}, así que estos "
        "datos no distinguen un cambio de su ausencia."
    )


# The contrasts the book reports (its conclusions list every one that is significant): the
# main metrics, on the val-selected checkpoint in test and at epoch 1 and the last epoch in val.
SIGNIFICANT_METRICS = ("map", "critical_recall", "op_recall_critical")
SIGNIFICANT_SETS = (("test", "best"), ("val", "epoch1"), ("val", "final"))


def reported(contrast: dict[str, Any]) -> bool:
    """Whether the book reports this contrast (`SIGNIFICANT_METRICS` x `SIGNIFICANT_SETS`)."""
    return contrast["metric"] in SIGNIFICANT_METRICS and (
        contrast["split"], contrast["which"]
    ) in SIGNIFICANT_SETS


def significant(pm: dict[str, Any]) -> list[dict[str, Any]]:
    """Every reported contrast (`SIGNIFICANT_METRICS` x `SIGNIFICANT_SETS`, each variant
    against Phase 1 and against the adopted recipe) whose interval excludes zero at the
    verdict's adjusted level (the rule's multiplicity correction over its hypotheses,
    ``rule.level_each``): what the conclusions must report, not only what the verdict
    decided on."""
    from defectfusion.analysis.bootstrap import seed_t_interval  # numpy and scipy: the report stage

    level = float(pm["rule"]["level_each"])
    every = family_level(pm)
    out = []
    for c in pm["contrasts"]:
        if not reported(c) or c.get("se") is None or c.get("diff") is None:
            continue
        lo, hi = seed_t_interval(c["diff"], c, level)
        if lo is None or hi is None or not (lo > 0 or hi < 0):  # a zero-width [0, 0] is not
            continue
        # the same difference with Bonferroni over every reported contrast: the list is a
        # selection from all of them, which the rule's adjustment (its hypotheses) ignores
        lo_all, hi_all = seed_t_interval(c["diff"], c, every)
        out.append({k: c[k] for k in ("a", "b", "metric", "split", "which", "diff", "ci")}
                   | {"ci_adjusted": [lo, hi], "level": level, "level_all": every,
                      "survives_all": bool(lo_all > 0 or hi_all < 0)})  # fmt: skip
    return out


def n_reported(pm: dict[str, Any]) -> int:
    """How many of the post-mortem's contrasts the book reports (`reported`)."""
    return sum(reported(c) for c in pm["contrasts"])


def family_level(pm: dict[str, Any]) -> float:
    """The level at which every reported contrast's interval holds together at the rule's
    level (Bonferroni over all of them, not only over the rule's hypotheses)."""
    from defectfusion.analysis.postmortem import adjusted_level  # deferred: loads scipy

    return adjusted_level({**pm["rule"], "adjust": "bonferroni"}, n_reported(pm))


def end_to_end_seconds(layout: Layout) -> float | None:
    """The run's duration on the clock: from the first job's start (its benchmark file's time
    less its wall time) to the last job's end (benchmarks/run_times.py's measure). None
    without the files, or when their times cannot be a run's (a `dvc pull` or checkout
    rewrites them: the span is then shorter than the chain data -> Phase 1 -> Phase 2 that
    any run waits for)."""
    return _span(_stage_jobs(layout))


def _stage_jobs(layout: Layout) -> list[tuple[str, float, float]]:
    """Each stage job's benchmark file name, wall seconds and modification time."""
    jobs = []
    for name in layout.stage_benchmarks():
        path = Path(name)
        bench = read_benchmark(path)
        if bench is not None and bench["s"] is not None:
            jobs.append((path.name, bench["s"], path.stat().st_mtime))
    return jobs


def _span(jobs: list[tuple[str, float, float]]) -> float | None:
    """`end_to_end_seconds` of these jobs."""
    if not jobs:
        return None
    span = max(e for _, _, e in jobs) - min(e - w for _, w, e in jobs)
    chain = sum(
        max((w for n, w, _ in jobs if n.startswith(prefix)), default=0.0)
        for prefix in ("data", "phase1_", "phase2_", "postmortem")
    )
    return round(span, 1) if span >= chain else None


def dvc_remote() -> str | None:
    """The URL of the DVC remote the checkout pushes to (.dvc/config's default), or None."""
    import configparser

    cfg = configparser.ConfigParser()
    try:
        cfg.read(".dvc/config", encoding="utf-8")
        name = cfg.get("core", "remote", fallback=None)
        return cfg.get(f'remote "{name}"', "url", fallback=None) if name else None
    except configparser.Error:
        return None


def reproduce_info(values: dict[str, Any], layout: Layout) -> dict[str, Any]:
    """What the reproducibility statement prints: the command that makes this run, the data
    generator's seed, the DVC remote, and the run's duration on the clock."""
    profile = (values.get("pipeline") or {}).get("profile") or "default"
    extra = "" if profile == "default" else f" --configfile configs/{profile}.yaml"
    jobs = _stage_jobs(layout)
    seconds, summed = _span(jobs), sum(w for _, w, _ in jobs)
    return {
        "command": f"snakemake --cores all{extra}",
        "data_seed": ((values.get("pipeline") or {}).get("dataset") or {}).get("seed"),
        "dvc_remote": dvc_remote() or "ninguno configurado",
        "wall_seconds": seconds,
        "wall_minutes": None if seconds is None else round(seconds / 60, 1),
        "wall_known": seconds is not None,
        # the jobs' own times summed (the runtime table's "Suma"): above the clock when jobs
        # overlapped, below it when the run also waited between jobs
        "jobs_seconds": round(summed),
        "jobs_exceed_wall": seconds is not None and summed > seconds,
        "wall_es": (
            f"{number_es(seconds / 60, '.1f')} min"
            if seconds is not None
            else "desconocida: las horas de los archivos no son las de la ejecución (p. ej., "
            "tras dvc pull)"
        ),
    }


def _sized(pm: dict[str, Any], variant: str) -> str:
    """A variant's Spanish name with its epoch-1 drop as a share of the thesis's ("Réplica de
    la tesis (13 % de la caída de la tesis)")."""
    f = (((pm.get("phase2") or {}).get(variant) or {}).get("verdict") or {}).get(
        "fraction_of_thesis"
    )
    name = variant_name_es(variant)
    return name if f is None else f"{name} ({number_es(100 * f, '.0f')}\u202f% de la caída de la tesis)"


def _late_drift(
    sig: list[dict[str, Any]], adopted: str, epoch0: dict[str, dict[str, float]] | None = None
) -> dict[str, Any]:
    """The last epoch's significant val falls against Phase 1 (from `significant`): which
    variants, by how much, in which metric, split into the part that was there at epoch 0,
    before any update (`epoch0`: variant -> metric -> that drift), and what training added,
    so the book does not read a starting gap as a decline ("Réplica de la tesis (mAP −0.0145:
    −0.0130 en la época 0 y −0.0015 al entrenar)")."""
    metric_es = {"map": "mAP", "critical_recall": "recall crítico"}
    late = [
        c for c in sig
        if c["a"] == "phase1" and c["which"] == "final" and c["split"] == "val"
        and c["diff"] < 0 and c["metric"] in metric_es
    ]  # fmt: skip
    variants = list(dict.fromkeys(c["b"] for c in late))  # in the contrasts' order
    epoch0 = epoch0 or {}

    def start(c: dict[str, Any]) -> float | None:
        return (epoch0.get(c["b"]) or {}).get(c["metric"])

    def one(c: dict[str, Any]) -> str:
        text = f"{metric_es[c['metric']]} {number_es(c['diff'], '+.4f')}"
        e0 = start(c)
        if e0 is None:
            return text
        return (
            f"{text}: {number_es(e0, '+.4f')} en la época 0 y "
            f"{number_es(c['diff'] - e0, '+.4f')} al entrenar"
        )

    sized = [
        f"{variant_name_es(v)} (" + "; ".join(one(c) for c in late if c["b"] == v) + ")"
        for v in variants
    ]
    # a gap already there before any update, as the book prints it (4 decimals)
    start_gap = [
        v for v in variants
        if any(c["b"] == v and (start(c) or 0.0) <= -0.00005 for c in late)
    ]  # fmt: skip
    return {
        "any": bool(late), "n": len(variants), "variants": variants, "sized": sized,
        # none holds over every reported contrast: indications, not findings
        "n_survive_all": sum(bool(c.get("survives_all")) for c in late),
        "indicative": not any(c.get("survives_all") for c in late),
        "adopted": adopted in variants,
        "n_map": len({c["b"] for c in late if c["metric"] == "map"}),
        "n_critical_recall": len({c["b"] for c in late if c["metric"] == "critical_recall"}),
        "start_gap_names": [variant_name_es(v) for v in start_gap],
        "n_start_gap": len(start_gap),
    }  # fmt: skip


def rule_power(pm: dict[str, Any], hypotheses: list[str]) -> dict[str, Any]:
    """What the rule could see at the seed count it ran: the largest, over the hypotheses,
    of the epoch-1 val drop its adjusted interval would declare in about 80 % of runs with
    that hypothesis's measured spread (`bootstrap.detectable_drop`), beside the smallest drop
    its size condition accepts and the thesis's own. ``powered``: even the least precise
    hypothesis would have seen a drop of the size the rule calls a reproduction."""
    from defectfusion.analysis.bootstrap import POWER  # deferred: loads scipy

    verdicts = {v: ((pm.get("phase2") or {}).get(v) or {}).get("verdict") or {} for v in hypotheses}
    sized = {v: d["detectable_drop"] for v, d in verdicts.items() if d.get("detectable_drop")}
    if not sized:  # no hypothesis, or none with a spread: every key, none known
        return {"known": False, "powered": False, "worst": None, "power": POWER,
                "bounds_exclude_threshold": False, **dict.fromkeys(
            ("detectable_max", "detectable_min", "reproduce_threshold", "thesis_drop",
             "share_of_threshold", "lowest_bound"))}  # fmt: skip
    worst = max(sized, key=lambda v: sized[v])
    threshold = verdicts[worst].get("reproduce_threshold")
    lows = [d["ci_adjusted"][0] for d in verdicts.values() if (d.get("ci_adjusted") or [None])[0] is not None]
    return {
        "known": True,
        "power": POWER,
        "detectable_max": sized[worst],
        "detectable_min": min(sized.values()),
        "worst": variant_name_es(worst),
        "reproduce_threshold": threshold,
        "thesis_drop": abs(pm["thesis"]["drop"]),
        "powered": threshold is not None and sized[worst] <= threshold,
        "share_of_threshold": None if not threshold else sized[worst] / threshold,
        # the lowest adjusted lower bound over the hypotheses: whether any interval reaches
        # the drop the rule calls a reproduction
        "lowest_bound": min(lows) if lows else None,
        "bounds_exclude_threshold": bool(lows) and threshold is not None
        and min(lows) > -threshold,
    }


def _with_equivalence(effects: dict[str, Any], margin: float) -> dict[str, Any]:
    """The named effects, each measurement with ``equivalent``: its 95 % interval lies inside
    the rule's equivalence margin (`postmortem.within_margin`; a stricter test than the 90 %
    interval TOST uses), so the book can say "does not change" where the interval allows it,
    not only "inconclusive"."""
    from defectfusion.analysis.postmortem import within_margin  # deferred: loads scipy

    out = copy.deepcopy(effects)
    for effect in out.values():  # {"a", "b", which: {split: {metric: measurement}}}
        for splits in (x for x in effect.values() if isinstance(x, dict)):
            for measurement in (d for metrics in splits.values() for d in metrics.values()):
                measurement["equivalent"] = within_margin(measurement.get("ci"), margin)
    return out


def coverage_summary(cov: dict[str, Any] | None) -> dict[str, Any]:
    """The post-mortem's coverage check (`analysis.coverage`) as the book quotes it: the
    worst coverage over the seed spreads at 95 % and at the rule's adjusted level."""
    keys = ("n_seeds", "n_images", "n_boot", "trials")
    if not cov:
        return {"known": False, "covers": False, **dict.fromkeys(
            (*keys, "min_95", "min_adjusted", "level_adjusted", "spread_min", "spread_max"))}  # fmt: skip
    return {
        "known": True,
        "covers": bool(cov["covers"]),
        **{k: cov[k] for k in keys},
        "min_95": cov["min_coverage"][0],
        "min_adjusted": cov["min_coverage"][-1],
        "level_adjusted": cov["levels"][-1],
        "spread_min": min(cov["spreads"]),
        "spread_max": max(cov["spreads"]),
    }


def postmortem_summary(pm: dict[str, Any]) -> dict[str, Any]:
    """Top-level ``contrasts`` and ``postmortem`` (what the book's §5.4-5.5 read)."""
    sig = significant(pm)
    other = [  # epoch-1 val falls on a metric the rule does not judge (below)
        c for c in sig if c["a"] == "phase1" and c["which"] == "epoch1"
        and c["split"] == "val" and c["metric"] != "map"
    ]  # fmt: skip
    return {
        "contrasts": pm["contrasts"],
        "postmortem": {
            "adopted": pm["adopted"],
            "n_seeds": len(pm["seeds"]),
            # the study design: Phase 1 runs (one unless pipeline.phase1_seeds), and the
            # Phase 2 seeds on each
            "n_phase1": (n1 := len(pm.get("phase1_runs") or [None])),
            "n_seeds_each": len(pm["seeds"]) // n1,
            "n_boot": pm["n_boot"],
            "ci_level": pm["ci_level"],
            "seconds": pm["seconds"],
            "covers": pm["covers"],
            "thesis": pm["thesis"],
            "rule": pm["rule"],
            "effects": _with_equivalence(pm["effects"], float(pm["rule"]["equivalence_margin"])),
            # the equivalence margin as a share of the thesis's drop: what "no change" allows
            "margin_share": float(pm["rule"]["equivalence_margin"]) / abs(pm["thesis"]["drop"]),
            "factorial": pm["factorial"],
            "has_factorial": pm["factorial"] is not None,
            "operating_point": pm["operating_point"],
            "hypotheses": (hypotheses := [v for v in pm["variants"] if v != pm["adopted"]]),
            "n_hypotheses": len(hypotheses),
            # the conclusions' list (report.tables.significant_table): how many of how many
            # reported, and whether there is any
            "n_significant": len(sig),
            # after epoch 1: the variants whose val metrics fall against Phase 1 by the last
            # epoch at the same adjusted level (the verdict judges epoch 1 only)
            "late": _late_drift(sig, pm["adopted"], {
                v: {m: d["diff"] for m, d in e["drift"]["epoch0"]["val"].items()}
                for v, e in (pm.get("phase2") or {}).items() if "epoch0" in e.get("drift", {})
            }),  # fmt: skip
            # epoch-1 val falls against Phase 1 on a metric the rule does not judge (it judges
            # mAP): significant at the rule's adjusted level, named so the verdict reports them
            "epoch1_other": [
                f"{variant_name_es(c['b'])} ({METRIC_NAMES_ES[c['metric']]}, "
                f"{number_es(c['diff'], '+.4f')})"
                for c in other
            ],
            "n_epoch1_other": len(other),
            # of those, the ones that hold over every reported contrast (`significant`)
            "n_epoch1_other_all": sum(c["survives_all"] for c in other),
            "power": rule_power(pm, hypotheses),
            "coverage": coverage_summary(pm.get("coverage")),
            "n_reported": n_reported(pm),
            "any_significant": bool(sig),
            # of those, the ones that hold with Bonferroni over every reported contrast
            "n_significant_all": sum(c["survives_all"] for c in sig),
            "level_all": family_level(pm),
            "outcome": {
                **pm["outcome"],
                # the book prints these lists (each "<branch>_variants" of the outcome, and
                # "removing_variants"): the variants' Spanish names
                **{
                    k.removesuffix("_variants") + "_names": [variant_name_es(v) for v in vs]
                    for k, vs in pm["outcome"].items()
                    if k.endswith("_variants")
                },
                # the same lists with each variant's epoch-1 val drop as a share of the
                # thesis's relative drop, so the verdict prints the size it judged
                **{
                    k.removesuffix("_variants") + "_sized": [_sized(pm, v) for v in vs]
                    for k, vs in pm["outcome"].items()
                    if k.endswith("_variants")
                },
            },
            "phase1": {
                "operating_point": _operating_point(
                    pm["phase1"]["test"], pm["calibration"]["phase1"]["test"]
                ),
                "val_map": pm["phase1"]["val"]["map"]["value"],
            },
        },
    }


def write_summary(
    values: dict[str, Any], out: str | Path, rule: str = "manual", results: str = "results"
) -> dict[str, Any]:
    """Write `out` and its provenance sidecar (under `results`/provenance)."""
    layout = Layout.from_config(values, results)
    inputs = inputs_of(layout, "summary", "summary")
    record = prov.make_record(
        "summary/summary", rule, prov.params_subset(values, PARAM_SECTIONS), inputs
    )
    summary = build_summary(values, layout)
    atomic_write_json(out, summary)
    prov.write_sidecar(results, record, [Path(out)])
    return summary
