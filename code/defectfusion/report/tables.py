"""The thesis's tables, each as CSV, Markdown and LaTeX, from the results files.

==================  =========================================================================
``dataset``         images (holding at least one box of the class) and boxes per class and
                    split, from ``DATA/annotations/*.json``
``phase1``          each backbone preset on test: mAP, mAP50, mAP75, AP per class, critical
                    recall (AR@[.50:.95] and recall at IoU .5), composite, parameters, best
                    epoch, training seconds, and ms per test image of the evaluate job
``phase2``          Phase 1's main model, then each Phase 2 variant (one row per seed; a mean
                    row when there are several): the same test metrics, val mAP at epochs 0
                    and 1, best epoch, and the paired-bootstrap difference from Phase 1 (B - A)
                    in mAP and critical recall with its 95% CI and P(B > A)
``per_class_recall``  per class on test, Phase 1 (main preset) vs Phase 2 (the adopted
                    variant, first seed): AP, recall, recall at IoU .5; critical classes marked
==================  =========================================================================

CSV keeps full precision (a CI is a JSON list); Markdown and LaTeX round for reading. Each
file starts with its provenance as a comment (``# ``, ``<!-- -->``, ``% ``); CSV readers
skip it with ``comment="#"``. A null value ("nothing to measure") prints as ``n/a``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate

from defectfusion.data.coco import load_json
from defectfusion.errors import UserError
from defectfusion.fsutil import atomic_write_text
from defectfusion.report import PARAM_SECTIONS, SPLIT_NAMES, TABLES, Layout, chosen
from defectfusion.report import provenance as prov
from defectfusion.report import summary as S

CRITICAL_MARK = "†"
NA = "n/a"
# Characters pdfLaTeX does not know from UTF-8 alone.
TEX_SYMBOLS = {"Δ": r"$\Delta$", "†": r"\dag{}", ">": r"$>$"}


@dataclass(frozen=True)
class Col:
    key: str
    header: str
    fmt: str = "3"  # s: text, d: integer, 3: 3 decimals, +3: signed, 1/0: decimals, ci, %


@dataclass
class Table:
    title: str
    columns: list[Col]
    rows: list[dict[str, Any]]
    notes: list[str]


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return NA
    if isinstance(value, str) and fmt != "s":  # "": does not apply to this row
        return value
    if fmt == "s":
        return str(value)
    if fmt == "d":
        return f"{int(value):,}"
    if fmt == "ci":
        lo, hi = value
        return NA if lo is None or hi is None else f"[{lo:+.3f}, {hi:+.3f}]"
    if fmt == "%":
        return f"{100 * value:.0f}%"
    if fmt == "+3":
        return f"{value:+.3f}"
    return f"{value:.{int(fmt)}f}"


def _raw(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "[" + ", ".join("" if v is None else repr(v) for v in value) + "]"
    return str(value)


def render(table: Table, record: dict[str, Any]) -> dict[str, str]:
    """The table as {"csv", "md", "tex"} text, each headed by its provenance comment."""
    line = prov.one_line(record)
    headers = [c.header for c in table.columns]
    cells = [[_fmt(r.get(c.key), c.fmt) for c in table.columns] for r in table.rows]
    align = ["left" if c.fmt == "s" else "right" for c in table.columns]

    buf = io.StringIO()
    buf.write(f"# provenance: {line}\n")
    for note in table.notes:
        buf.write(f"# note: {note}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows([[_raw(r.get(c.key)) for c in table.columns] for r in table.rows])

    md = tabulate(cells, headers, tablefmt="pipe", colalign=align, disable_numparse=True)
    notes = "".join(f"\n{n}\n" for n in table.notes)
    md_text = f"<!-- provenance: {line} -->\n# {table.title}\n\n{md}\n{notes}"

    tex_cells = [[c.replace(NA, "--") for c in row] for row in cells]
    tex = tabulate(
        tex_cells, headers, tablefmt="latex_booktabs", colalign=align, disable_numparse=True
    )
    for char, command in TEX_SYMBOLS.items():  # after tabulate's escaping of $ and \\
        tex = tex.replace(char, command)
    tex_notes = "".join(f"% note: {n}\n" for n in table.notes)
    tex_text = f"% provenance: {line}\n% {table.title}\n{tex_notes}{tex}\n"
    return {"csv": buf.getvalue(), "md": md_text, "tex": tex_text}


# ---- the tables ---------------------------------------------------------------------------


def _mark(name: str, critical: Sequence[str]) -> str:
    return f"{name}{CRITICAL_MARK}" if name in critical else name


def _critical(values: dict[str, Any], classes: list[str]) -> list[str]:
    return S.critical_names(
        classes, values["data"]["critical_classes"], "config data.critical_classes"
    )


def dataset_table(values: dict[str, Any], layout: Layout) -> Table:
    ds = S.dataset_counts(layout)
    critical = _critical(values, ds["classes"])
    cols = [Col("class", "Class", "s"), Col("id", "Id", "d")]
    for s in SPLIT_NAMES:
        cols += [Col(f"{s}_images", f"{s} images", "d"), Col(f"{s}_boxes", f"{s} boxes", "d")]
    rows = []
    for i, name in enumerate(ds["classes"]):
        row: dict[str, Any] = {"class": _mark(name, critical), "id": i}
        for s in SPLIT_NAMES:
            row[f"{s}_images"] = ds["splits"][s]["images"][name]
            row[f"{s}_boxes"] = ds["splits"][s]["boxes"][name]
        rows.append(row)
    total: dict[str, Any] = {"class": "all", "id": ""}
    for s in SPLIT_NAMES:
        total[f"{s}_images"] = ds["splits"][s]["n_images"]
        total[f"{s}_boxes"] = ds["splits"][s]["n_boxes"]
    rows.append(total)
    return Table(
        f"Dataset {ds['name']}: images and boxes per class and split",
        cols,
        rows,
        [
            f"{CRITICAL_MARK} critical class. A class's images are the images holding at least "
            "one box of it; row 'all' counts every image of the split, with or without boxes."
        ],
    )


def _class_ap_cols(classes: list[str], critical: list[str]) -> list[Col]:
    return [Col(f"ap_{n}", f"AP {_mark(n, critical)}") for n in classes]


def _class_ap(metrics: dict[str, Any]) -> dict[str, Any]:
    return {f"ap_{n}": pc.get("ap") for n, pc in metrics["per_class"].items()}


def _classes(layout: Layout) -> list[str]:
    return S.class_order(load_json(layout.phase1(layout.main, "test_metrics.json")))


METRIC_COLS = [
    Col("map", "mAP"),
    Col("map50", "mAP50"),
    Col("map75", "mAP75"),
    Col("critical_recall", "Crit. recall"),
    Col("critical_recall50", "Crit. recall@.5"),
    Col("composite", "Composite"),
]


def phase1_table(values: dict[str, Any], layout: Layout) -> Table:
    classes = _classes(layout)
    critical = _critical(values, classes)
    cols = [
        Col("preset", "Preset", "s"),
        Col("parameters", "Parameters", "d"),
        *METRIC_COLS,
        *_class_ap_cols(classes, critical),
        Col("best_epoch", "Best epoch", "d"),
        Col("train_seconds", "Train s", "0"),
        Col("ms_per_image", "Eval ms/img", "1"),
    ]
    rows = []
    for preset in layout.presets:
        entry = S.phase1_entry(layout, preset)
        metrics = load_json(layout.phase1(preset, "test_metrics.json"))
        rows.append(
            {
                **entry,
                **_class_ap(metrics),
                "preset": f"{preset} (main)" if preset == layout.main else preset,
                "ms_per_image": S.eval_ms_per_image(layout, preset),
            }
        )
    return Table(
        "Phase 1 on test: each backbone with the same DEIMv2 head",
        cols,
        rows,
        [
            "Test split. Crit. recall: COCO AR@[.50:.95] (maxDets 100) averaged over the "
            f"critical classes ({CRITICAL_MARK}); @.5: recall at IoU 0.5. Composite: "
            + " + ".join(f"{w:g}*{k}" for k, w in values["eval"]["composite_weights"].items())
            + ".",
            "Best epoch: the val-selected checkpoint. Train s: training time without "
            "validation. Eval ms/img: wall time of the whole evaluate job (process start-up "
            "and model loading included) divided by the test images, an upper bound on "
            "inference latency.",
        ],
    )


def phase2_table(values: dict[str, Any], layout: Layout) -> Table:
    classes = _classes(layout)
    critical = _critical(values, classes)
    cols = [
        Col("model", "Model", "s"),
        Col("seed", "Seed", "s"),
        *METRIC_COLS,
        *_class_ap_cols(classes, critical),
        Col("val_map0", "Val mAP ep.0"),
        Col("val_map1", "Val mAP ep.1"),
        Col("best_epoch", "Best epoch", "d"),
        Col("diff_map", "ΔmAP", "+3"),
        Col("ci_map", "ΔmAP 95% CI", "ci"),
        Col("diff_cr", "ΔCrit. recall", "+3"),
        Col("ci_cr", "ΔCrit. recall 95% CI", "ci"),
        Col("p_map", "P(ΔmAP>0)", "%"),
    ]
    p1_path = layout.phase1(layout.main, "history.jsonl")
    p1_best = S.best_row(S.read_jsonl(p1_path), p1_path)
    p1_test = load_json(layout.phase1(layout.main, "test_metrics.json"))
    rows = [
        {
            "model": f"Phase 1 ({layout.main})",
            "seed": "",
            **{c.key: p1_test.get(c.key) for c in METRIC_COLS},
            **_class_ap(p1_test),
            "val_map0": p1_best.get("val_map"),
            "best_epoch": p1_best["epoch"],
            **dict.fromkeys(("val_map1", "diff_map", "ci_map", "diff_cr", "ci_cr", "p_map"), ""),
        }
    ]
    for variant in layout.variants:
        runs = S.phase2_runs(layout, variant)
        for run in runs:
            e1 = S.epoch_row(run["history"], 1) or {}
            c = run["compare"]
            rows.append(
                {
                    "model": variant,
                    "seed": str(run["seed"]),
                    **{col.key: run["test"].get(col.key) for col in METRIC_COLS},
                    **_class_ap(run["test"]),
                    "val_map0": S.epoch_row(run["history"], 0)["val_map"],
                    "val_map1": e1.get("val_map"),
                    "best_epoch": run["best"]["epoch"],
                    "diff_map": c["map"]["diff"],
                    "ci_map": c["map"]["ci95"],
                    "diff_cr": c["critical_recall"]["diff"],
                    "ci_cr": c["critical_recall"]["ci95"],
                    "p_map": c["map"]["frac_b_gt_a"],
                }
            )
        if len(runs) > 1:
            e = S.phase2_entry(layout, variant)
            rows.append(
                {
                    "model": f"{variant} (mean)",
                    "seed": f"{len(runs)} seeds",
                    **{
                        col.key: S.mean(r["test"].get(col.key) for r in runs) for col in METRIC_COLS
                    },
                    **{
                        f"ap_{n}": S.mean(r["test"]["per_class"][n].get("ap") for r in runs)
                        for n in classes
                    },
                    "val_map0": e["epoch0_val_map"],
                    "val_map1": e["epoch1_val_map"],
                    "best_epoch": e["best_epoch"],
                    "diff_map": e["diff_map"],
                    "ci_map": e["ci_map"],
                    "diff_cr": e["diff_critical_recall"],
                    "ci_cr": e["ci_critical_recall"],
                    "p_map": e["frac_b_gt_a_map"],
                }
            )
    return Table(
        "Phase 2 on test: the adopted variant and the controls, against Phase 1",
        cols,
        rows,
        [
            "Test metrics of each run's val-selected checkpoint. Δ: Phase 2 minus Phase 1 "
            f"({layout.main}) on the same test images; 95% CI: paired bootstrap over test "
            "images; P(ΔmAP>0): fraction of bootstrap replicates where Phase 2 is higher.",
            "Val mAP ep.0: before any update (zero-start must equal Phase 1's); on the Phase 1 "
            "row, the val mAP of its best epoch. A mean row averages its seeds; its CI is the "
            "envelope of the per-seed intervals.",
        ],
    )


def per_class_recall_table(values: dict[str, Any], layout: Layout) -> Table:
    variant, seed = layout.adopted
    a = load_json(layout.phase1(layout.main, "test_metrics.json"))
    b = load_json(layout.phase2(variant, seed, "test_metrics.json"))
    classes = S.class_order(a)
    critical = _critical(values, classes)
    cols = [
        Col("class", "Class", "s"),
        Col("critical", "Critical", "s"),
        Col("n_gt", "Test boxes", "d"),
        Col("ap_a", "AP P1"),
        Col("ap_b", "AP P2"),
        Col("recall_a", "Recall P1"),
        Col("recall_b", "Recall P2"),
        Col("diff", "ΔRecall", "+3"),
        Col("recall50_a", "Recall@.5 P1"),
        Col("recall50_b", "Recall@.5 P2"),
    ]
    rows = []
    for name in classes:
        pa, pb = a["per_class"][name], b["per_class"].get(name)
        if pb is None:
            raise UserError(
                f"{layout.phase2(variant, seed, 'test_metrics.json')}: no class {name!r}"
            )
        ra, rb = pa.get("recall"), pb.get("recall")
        rows.append(
            {
                "class": _mark(name, critical),
                "critical": "yes" if name in critical else "",
                "n_gt": pa.get("n_gt"),
                "ap_a": pa.get("ap"),
                "ap_b": pb.get("ap"),
                "recall_a": ra,
                "recall_b": rb,
                "diff": None if ra is None or rb is None else rb - ra,
                "recall50_a": pa.get("recall50"),
                "recall50_b": pb.get("recall50"),
            }
        )
    return Table(
        "AP and recall per class on test, Phase 1 vs Phase 2",
        cols,
        rows,
        [
            f"P1: Phase 1 ({layout.main}); P2: Phase 2 {variant} (seed {seed}), both the "
            "val-selected checkpoint. Recall: COCO AR@[.50:.95] (maxDets 100); Recall@.5 at "
            f"IoU 0.5. {CRITICAL_MARK} critical class."
        ],
    )


BUILDERS: dict[str, Callable[[dict[str, Any], Layout], Table]] = {
    "dataset": dataset_table,
    "phase1": phase1_table,
    "phase2": phase2_table,
    "per_class_recall": per_class_recall_table,
}
assert tuple(BUILDERS) == TABLES


def write_tables(
    values: dict[str, Any],
    out: str | Path,
    only: Sequence[str] | None = None,
    rule: str = "manual",
    results: str = "results",
) -> list[Path]:
    """Write tables `only` (default: all) as ``out/NAME.{csv,md,tex}`` and their sidecars."""
    names = chosen(only, TABLES, "table")
    layout = Layout.from_config(values, results)
    params = prov.params_subset(values, PARAM_SECTIONS)
    written: list[Path] = []
    for name in names:
        record = prov.make_record(
            f"tables/{name}",
            rule,
            params,
            layout.inputs("tables", name),
            layout.optional_inputs("tables", name),
        )
        texts = render(BUILDERS[name](values, layout), record)
        paths = [atomic_write_text(Path(out) / f"{name}.{ext}", t) for ext, t in texts.items()]
        prov.write_sidecar(results, record, paths)
        written += paths
    return written
