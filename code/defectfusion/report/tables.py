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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from defectfusion.config import read_yaml
from defectfusion.core.environment import LOCK_FILE, read_lock
from defectfusion.core.errors import UserError
from defectfusion.core.fsutil import atomic_write_text
from defectfusion.core.jsonio import load_json
from defectfusion.report import (
    DEIMV2_RECIPE,
    METRIC_NAMES_ES,
    PARAM_SECTIONS,
    SPLIT_NAMES,
    TABLES,
    THESIS_FIGURES,
    Layout,
    backbone_name_es,
    chosen,
    class_name_es,
    inputs_of,
    optional_inputs_of,
    preset_setting,
    text_encoder_es,
    variant_name_es,
)
from defectfusion.report import provenance as prov
from defectfusion.report import summary as S

CRITICAL_MARK = "†"
NA = "n/a"
NA_ES = "n/d"
MINUS = "\u2212"  # the book's minus sign (U+2212), never the ASCII hyphen
NNBSP = "\u202f"  # narrow no-break space: thousands (RAE), and before "%"
# Characters pdfLaTeX does not know from UTF-8 alone.
TEX_SYMBOLS = {"Δ": r"$\Delta$", "†": r"\dag{}", ">": r"$>$", "α": r"$\alpha$", "τ": r"$\tau$"}


@dataclass(frozen=True)
class Col:
    key: str
    header: str
    # s: text, d: integer, 3: 3 decimals, 1/0: decimals, %; differences (+3: signed, ci: an
    # interval) print with 4 signed decimals, so a small one is not shown as a sign-less 0.000
    fmt: str = "3"
    es: str | None = None  # the header in the book's Markdown (Spanish); None: `header`
    # +ci: the signed difference at `key` with the interval at `ci_key` in one cell
    ci_key: str | None = None
    align: str | None = None  # the Markdown's alignment; default: text left, numbers right


@dataclass
class Table:
    title: str
    columns: list[Col]
    rows: list[dict[str, Any]]
    notes: list[str]
    # The book's Markdown is in Spanish: its title and notes; string cells from the row's
    # "KEY_es" when there is one. CSV and LaTeX keep the English (for reuse).
    title_es: str = ""
    notes_es: list[str] = field(default_factory=list)
    es_columns: list[Col] | None = None  # the Markdown's columns, when they differ
    es_rows: list[dict[str, Any]] | None = None  # the Markdown's rows, when they differ


def _fmt(value: Any, fmt: str, ci: Any = None) -> str:
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
        return NA if lo is None or hi is None else f"[{lo:+.4f}, {hi:+.4f}]"
    if fmt == "+ci":
        return f"{value:+.4f} {_fmt(ci, 'ci')}"
    if fmt == "%":
        return f"{100 * value:.0f}%"
    if fmt == "+3":
        return f"{value:+.4f}"
    return f"{value:.{int(fmt)}f}"


def _num_es(value: float, spec: str) -> str:
    """A number as the book prints it: decimal point, U+2212 minus, no negative zero."""
    text = format(value, spec)
    if float(text.replace(",", "")) == 0:  # -0.000 and +0.000: no sign on a zero
        text = text.lstrip("+-")
    return text.replace("-", MINUS).replace(",", NNBSP)


def fmt_es(value: Any, fmt: str, ci: Any = None) -> str:
    """A cell of the book's (Spanish) Markdown table; the same conventions as thesis_values.fmt
    (decimal point, a narrow space between thousands from five digits on, true minus)."""
    if value is None:
        return NA_ES
    if isinstance(value, str) and fmt != "s":
        return value
    if fmt == "s":
        return str(value)
    if fmt == "d":
        return _num_es(int(value), "," if abs(int(value)) >= 10000 else "d")
    if fmt == "ci":
        lo, hi = value
        if lo is None or hi is None:
            return NA_ES
        return f"[{_num_es(lo, '+.4f')}, {_num_es(hi, '+.4f')}]"
    if fmt == "+ci":
        return f"{_num_es(value, '+.4f')} {fmt_es(ci, 'ci')}"
    if fmt == "%":
        return f"{_num_es(100 * value, '.0f')}{NNBSP}%"
    if fmt == "+3":
        return _num_es(value, "+.4f")
    grouping = "," if abs(float(value)) >= 10000 else ""  # a narrow space from five digits on
    return _num_es(float(value), f"{grouping}.{int(fmt)}f")


def _raw(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "[" + ", ".join("" if v is None else repr(v) for v in value) + "]"
    return str(value)


def render(table: Table, record: dict[str, Any]) -> dict[str, str]:
    """The table as {"csv", "md", "tex"} text, each headed by its provenance comment.

    CSV and LaTeX are in English; the Markdown, which the book includes, is in Spanish."""
    line = prov.one_line(record)
    headers = [c.header for c in table.columns]
    cells = [[_fmt(r.get(c.key), c.fmt, r.get(c.ci_key or "")) for c in table.columns]
             for r in table.rows]  # fmt: skip
    align = ["left" if c.fmt == "s" else "right" for c in table.columns]

    buf = io.StringIO()
    buf.write(f"# provenance: {line}\n")
    for note in table.notes:
        buf.write(f"# note: {note}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(
        [[_raw(r.get(c.key + "_raw", r.get(c.key))) for c in table.columns] for r in table.rows]
    )

    es_columns = table.es_columns or table.columns
    es_headers = [c.es or c.header for c in es_columns]
    es_cells = [
        [
            fmt_es(r.get(f"{c.key}_es", r.get(c.key)), c.fmt, r.get(c.ci_key or ""))
            for c in es_columns
        ]
        for r in (table.es_rows if table.es_rows is not None else table.rows)
    ]
    es_align = [
        c.align or ("left" if c.fmt == "s" and not c.key.endswith(("_pair", "seed")) else "right")
        for c in es_columns
    ]
    md = tabulate(es_cells, es_headers, tablefmt="pipe", colalign=es_align, disable_numparse=True)
    notes = "".join(f"\n{n}\n" for n in table.notes_es or table.notes)
    md_text = f"<!-- provenance: {line} -->\n# {table.title_es or table.title}\n\n{md}\n{notes}"

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


def _mark_es(name: str, critical: Sequence[str]) -> str:
    return _mark(class_name_es(name), [class_name_es(c) for c in critical])


def _critical(values: dict[str, Any], classes: list[str]) -> list[str]:
    return S.critical_names(
        classes, values["data"]["critical_classes"], "config data.critical_classes"
    )




def _epochs_run(history: list[dict[str, Any]]) -> int:
    return max((int(r["epoch"]) for r in history), default=0)


SPLIT_ES = {"train": "Entrenamiento", "val": "Validación", "test": "Prueba"}


def dataset_table(values: dict[str, Any], layout: Layout) -> Table:
    ds = S.dataset_counts(layout)
    critical = _critical(values, ds["classes"])
    cols = [Col("class", "Class", "s", "Clase"), Col("id", "Id", "d", "Id")]
    for s in SPLIT_NAMES:
        cols += [
            Col(f"{s}_images", f"{s} images", "d"),
            Col(f"{s}_boxes", f"{s} boxes", "d"),
        ]
    rows = []
    for i, name in enumerate(ds["classes"]):
        row: dict[str, Any] = {
            "class": _mark(name, critical),
            "class_es": _mark_es(name, critical),
            "id": i,
        }
        for s in SPLIT_NAMES:
            row[f"{s}_images"] = ds["splits"][s]["images"][name]
            row[f"{s}_boxes"] = ds["splits"][s]["boxes"][name]
        rows.append(row)
    total: dict[str, Any] = {"class": "all", "class_es": "Todas", "id": ""}
    for s in SPLIT_NAMES:
        total[f"{s}_images"] = ds["splits"][s]["n_images"]
        total[f"{s}_boxes"] = ds["splits"][s]["n_boxes"]
    rows.append(total)
    # The book's table is compact: one column per split, "images / boxes".
    es_cols = [Col("class", "Class", "s", "Clase"), Col("id", "Id", "d", "Id")]
    for s in SPLIT_NAMES:
        es_cols.append(Col(f"{s}_pair", f"{s} images / boxes", "s", f"{SPLIT_ES[s]}"))
        for r in rows:
            r[f"{s}_pair"] = f"{fmt_es(r[f'{s}_images'], 'd')} / {fmt_es(r[f'{s}_boxes'], 'd')}"
    return Table(
        f"Dataset {ds['name']}: images and boxes per class and split",
        cols,
        rows,
        [
            f"{CRITICAL_MARK} critical class. A class's images are the images holding at least "
            "one box of it; row 'all' counts every image of the split, with or without boxes."
        ],
        f"Conjunto {ds['name']}: imágenes / cajas por clase y partición",
        [
            f"Cada celda: imágenes / cajas. {CRITICAL_MARK} clase crítica. Las imágenes de una "
            "clase son las que tienen al menos una caja suya; la fila «Todas» cuenta todas las "
            "imágenes de la partición, tengan cajas o no."
        ],
        es_columns=es_cols,
    )


def _class_ap_cols(classes: list[str], critical: list[str]) -> list[Col]:
    return [
        Col(f"ap_{n}", f"AP {_mark(n, critical)}", "3", f"AP {_mark_es(n, critical)}")
        for n in classes
    ]


def _class_ap(metrics: dict[str, Any]) -> dict[str, Any]:
    return {f"ap_{n}": pc.get("ap") for n, pc in metrics["per_class"].items()}


def _classes(layout: Layout) -> list[str]:
    return S.class_order(load_json(layout.phase1(layout.main, "test_metrics.json")))


METRIC_COLS = [
    Col("map", "mAP", "3", "mAP"),
    Col("map50", "mAP50", "3", "mAP50"),
    Col("map75", "mAP75", "3", "mAP75"),
    Col("critical_recall", "Crit. recall", "3", "Recall crítico"),
    Col("critical_recall50", "Crit. recall@.5", "3", "Recall crítico a IoU 0.5"),
    Col("composite", "Composite", "3", "Puntuación compuesta"),
]


def _composite_text(values: dict[str, Any], es: bool = False) -> str:
    names = {"map": "mAP", "critical_recall": "recall crítico" if es else "critical recall"}
    mult = " × " if es else "*"
    return " + ".join(
        f"{w:g}{mult}{names.get(k, k)}" for k, w in values["eval"]["composite_weights"].items()
    )


def _phase1_rows(values: dict[str, Any], layout: Layout) -> list[dict[str, Any]]:
    rows = []
    for preset in layout.presets:
        entry = S.phase1_entry(layout, preset)
        metrics = load_json(layout.phase1(preset, "test_metrics.json"))
        history = S.read_jsonl(layout.phase1(preset, "history.jsonl"))
        rows.append(
            {
                **entry,
                **_class_ap(metrics),
                "preset": f"{preset} (main)" if preset == layout.main else preset,
                "preset_es": backbone_name_es(preset, values, layout.main),
                "epochs": _epochs_run(history),
                "ms_per_image": S.eval_ms_per_image(layout, preset),
            }
        )
    return rows


def phase1_table(values: dict[str, Any], layout: Layout) -> Table:
    cols = [
        Col("preset", "Preset", "s", "Backbone"),
        Col("parameters", "Parameters", "d", "Parámetros"),
        Col("epochs", "Epochs", "d", "Épocas"),
        Col("map", "mAP", "3", "mAP"),
        Col("map50", "mAP50", "3", "mAP50"),
        Col("critical_recall", "Crit. recall", "3", "Recall crítico"),
        Col("critical_recall50", "Crit. recall@.5", "3", "Recall crít. a IoU 0.5"),
        Col("best_epoch", "Best epoch", "d", "Mejor época"),
    ]
    return Table(
        "Phase 1 on test: each backbone with the same DEIMv2 head",
        cols,
        _phase1_rows(values, layout),
        [
            "Test split. Crit. recall: COCO AR@[.50:.95] (maxDets 100) averaged over the "
            "critical classes; @.5: recall at IoU 0.5. Epochs: epochs trained (the backbones "
            "may have different budgets). Best epoch: the val-selected checkpoint."
        ],
        "Fase 1 en prueba: cada backbone de esta ejecución, bajo la misma cabeza DEIMv2",
        [
            "Partición de prueba. Recall crítico: recall medio COCO AR@[.50:.95] (100 "
            "detecciones por imagen) promediado sobre las clases críticas. Épocas: las que "
            "entrenó cada backbone. Mejor época: el "
            "punto de control elegido en validación. Detalle por clase en el apéndice."
        ],
    )


def _transpose(rows: list[dict[str, Any]], cols: list[Col], key: str) -> tuple[list, list]:
    """The book's Markdown of a wide table: one column per row of it (named by `key`), one
    row per column, so that it fits the text column."""
    names = [str(r.get(f"{key}_es", r.get(key))) for r in rows]
    es_cols = [Col("what", "", "s", "")] + [
        Col(f"c{i}", name, "s", name, align="right") for i, name in enumerate(names)
    ]
    es_rows = []
    for c in cols:
        if c.key == key:
            continue
        es_rows.append(
            {
                "what": c.es or c.header,
                **{f"c{i}": fmt_es(r.get(c.key), c.fmt) for i, r in enumerate(rows)},
            }
        )
    return es_cols, es_rows


def phase1_detail_table(values: dict[str, Any], layout: Layout) -> Table:
    classes = _classes(layout)
    critical = _critical(values, classes)
    cols = [
        Col("preset", "Preset", "s", "Backbone"),
        Col("map75", "mAP75", "3", "mAP75"),
        Col("composite", "Composite", "3", "Compuesta"),
        *_class_ap_cols(classes, critical),
        Col("train_seconds", "Train s", "0", "Entren. (s)"),
        Col("ms_per_image", "Eval ms/img", "0", "Eval. (ms/img.)"),
    ]
    rows = _phase1_rows(values, layout)
    es_cols, es_rows = _transpose(rows, cols, "preset")
    return Table(
        "Phase 1 on test, detail: AP per class, composite, time",
        cols,
        rows,
        [
            f"Composite: {_composite_text(values)}. {CRITICAL_MARK} critical class. Train s: "
            "training time without validation. Eval ms/img: wall time of the whole evaluate "
            "job (start-up and model loading included) per test image, an upper bound on "
            "inference latency."
        ],
        "Fase 1 en prueba, detalle: AP por clase, puntuación compuesta y tiempos",
        [
            f"Compuesta: {_composite_text(values, es=True)}. {CRITICAL_MARK} clase crítica. "
            "Entren.: tiempo de entrenamiento sin la validación. Eval.: tiempo total del "
            "trabajo de evaluación (arranque y carga del modelo incluidos) por imagen de "
            "prueba, una cota superior de la latencia de inferencia."
        ],
        es_columns=es_cols,
        es_rows=es_rows,
    )


def _phase2_rows(values: dict[str, Any], layout: Layout, per_seed: bool) -> list[dict[str, Any]]:
    """Phase 1's main model, then per variant its seeds (`per_seed`) and/or its mean."""
    pm = {} if per_seed else load_json(layout.postmortem)
    p1_path = layout.phase1(layout.main, "history.jsonl")
    p1_best = S.best_row(S.read_jsonl(p1_path), p1_path)
    p1_test = load_json(layout.phase1(layout.main, "test_metrics.json"))
    blank = ("val_map1", "diff_map", "ci_map", "diff_cr", "ci_cr", "p_map")
    rows = [
        {
            "model": f"Phase 1 ({layout.main})",
            "model_es": f"Fase 1 ({backbone_name_es(layout.main, values)})",
            "seed": "",
            **{c.key: p1_test.get(c.key) for c in METRIC_COLS},
            **_class_ap(p1_test),
            "val_map0": p1_best.get("val_map"),
            "best_epoch": p1_best["epoch"],
            **dict.fromkeys(blank, ""),
        }
    ]
    for variant in layout.variants:
        runs = S.phase2_runs(layout, variant) if per_seed else []
        tests = [load_json(layout.phase2(variant, s, "test_metrics.json")) for s in layout.seeds]
        name_es = variant_name_es(variant)
        for run in runs if per_seed else []:
            e1 = S.epoch_row(run["history"], 1) or {}
            c = load_json(layout.compare(variant, run["seed"]))["metrics"]
            rows.append(
                {
                    "model": variant,
                    "model_es": name_es,
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
        if not per_seed:
            # Over the seeds: the test metrics' mean, and the difference from Phase 1 with the
            # interval the book's text quotes (results/postmortem.json: a hierarchical
            # bootstrap over seeds and test images, the val-selected checkpoint).
            drift = pm["phase2"][variant]["drift"]["best"]["test"]
            rows.append(
                {
                    "model": variant,
                    "model_es": name_es,
                    "seed": f"{len(tests)} seeds",
                    "seed_es": f"{len(tests)} semilla" + ("s" if len(tests) > 1 else ""),
                    **{col.key: S.mean(t.get(col.key) for t in tests) for col in METRIC_COLS},
                    "diff_map": drift["map"]["diff"],
                    "ci_map": drift["map"]["ci"],
                    "diff_cr": drift["critical_recall"]["diff"],
                    "ci_cr": drift["critical_recall"]["ci"],
                    "p_map": drift["map"].get("frac_gt_0"),
                }
            )
    return rows


def phase2_table(values: dict[str, Any], layout: Layout) -> Table:
    cols = [
        Col("model", "Model", "s", "Modelo"),
        Col("map", "mAP", "3", "mAP"),
        Col("diff_map", "ΔmAP [95% CI]", "+ci", "ΔmAP [IC 95\u202f%]", ci_key="ci_map"),
        Col("critical_recall", "Crit. recall", "3", "Recall crítico"),
        Col("diff_cr", "ΔCrit. recall [95% CI]", "+ci", "Δ recall crítico [IC 95\u202f%]",
            ci_key="ci_cr"),
    ]  # fmt: skip
    return Table(
        "Phase 2 on test: the adopted variant and the controls, against Phase 1",
        cols,
        _phase2_rows(values, layout, per_seed=False),
        [
            "Test metrics of each run's val-selected checkpoint, mean over seeds. Δ: Phase 2 "
            f"minus Phase 1 ({layout.main}) on the same test images, with its 95% CI from "
            f"{layout.postmortem} (bootstrap over the seeds and the test images)."
        ],
        "Fase 2 en prueba: la variante adoptada y los controles frente a la Fase 1",
        [
            "Métricas de prueba del punto de control que eligió la validación, media sobre las "
            "semillas. Δ: Fase 2 menos Fase 1 sobre las mismas imágenes de prueba, con su "
            "intervalo de confianza del 95 % sin ajustar (sección 5.4: una *t* de Student sobre "
            "las semillas más un bootstrap emparejado de las imágenes de prueba; el veredicto "
            "usa el nivel ajustado). Detalle por semilla en el apéndice."
        ],
    )


def phase2_detail_table(values: dict[str, Any], layout: Layout) -> Table:
    cols = [
        Col("model", "Model", "s", "Modelo"),
        Col("seed", "Seed", "s", "Semilla"),
        Col("map50", "mAP50", "3", "mAP50"),
        Col("map75", "mAP75", "3", "mAP75"),
        Col("critical_recall50", "Crit. recall@.5", "3", "Recall crít. a IoU 0.5"),
        Col("composite", "Composite", "3", "Compuesta"),
        Col("val_map0", "Val mAP ep.0", "3", "mAP val. ép. 0"),
        Col("val_map1", "Val mAP ep.1", "3", "mAP val. ép. 1"),
        Col("best_epoch", "Best epoch", "d", "Mejor época"),
        Col("p_map", "P(ΔmAP>0)", "%", "P(ΔmAP > 0)"),
    ]
    return Table(
        "Phase 2 on test, detail per seed",
        cols,
        _phase2_rows(values, layout, per_seed=True),
        [
            f"Composite: {_composite_text(values)}. Val mAP ep.0: before any update "
            "(zero-start must equal Phase 1's); on the Phase 1 row, the val mAP of its best "
            "epoch. P(ΔmAP>0): fraction of bootstrap replicates where Phase 2 is higher."
        ],
        "Fase 2 en prueba, detalle por semilla",
        [
            f"Compuesta: {_composite_text(values, es=True)}. mAP val. ép. 0: antes de "
            "cualquier actualización (con el arranque en cero debe ser la de la Fase 1); en la "
            "fila de la Fase 1, la mAP de validación de su mejor época. P(ΔmAP > 0): fracción "
            "de réplicas bootstrap en que la Fase 2 queda por encima."
        ],
    )


def per_class_recall_table(values: dict[str, Any], layout: Layout) -> Table:
    variant, seed = layout.adopted
    a = load_json(layout.phase1(layout.main, "test_metrics.json"))
    b = load_json(layout.phase2(variant, seed, "test_metrics.json"))
    classes = S.class_order(a)
    critical = _critical(values, classes)
    cols = [
        Col("class", "Class", "s", "Clase"),
        Col("n_gt", "Test boxes", "d", "Cajas"),
        Col("ap_a", "AP P1", "3", "AP Fase 1"),
        Col("ap_b", "AP P2", "3", "AP Fase 2"),
        Col("recall_a", "Recall P1", "3", "Recall Fase 1"),
        Col("recall_b", "Recall P2", "3", "Recall Fase 2"),
        Col("diff", "ΔRecall", "+3", "Δ recall"),
        Col("recall50_a", "Recall@.5 P1", "3", "Recall a 0.5, Fase 1"),
        Col("recall50_b", "Recall@.5 P2", "3", "Recall a 0.5, Fase 2"),
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
                "class_es": _mark_es(name, critical),
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
        "AP y recall por clase en prueba, Fase 1 frente a Fase 2",
        [
            f"Fase 1: {backbone_name_es(layout.main, values)}; Fase 2: "
            f"{variant_name_es(variant).lower()} (semilla {seed}); en ambas, el punto de "
            "control elegido en validación. Recall: recall medio COCO AR@[.50:.95]; «a 0.5»: "
            f"recall a IoU 0.5. Cajas: cajas de prueba de la clase. {CRITICAL_MARK} clase "
            "crítica."
        ],
    )


# ---- settings: the thesis's beside this run's -------------------------------------------------


def _book_yaml(name: str, why: str) -> dict[str, Any]:
    """One of the book's hand-kept YAML files (thesis/), read safely; ``why``: what needs it."""

    path = Path(name)
    if not path.is_file():
        raise UserError(f"{path}: not found ({why})")
    values = read_yaml(path)
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping ({why})")
    return values


def _thesis_figures() -> dict[str, Any]:
    return _book_yaml(THESIS_FIGURES, "the settings table quotes the thesis from it")


def _es(value: Any) -> str:
    """A setting of this run as the book prints it."""
    if isinstance(value, bool):
        return "sí" if value else "no"
    if isinstance(value, float):
        text = f"{value:g}"
        if "e" in text:  # 5e-05 -> 5 × 10⁻⁵, as the book prints the thesis's
            mantissa, exponent = text.split("e")
            sup = str(int(exponent)).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))
            text = f"{mantissa}{NNBSP}×{NNBSP}10{sup}"
        return text.replace("-", MINUS)
    if isinstance(value, int):
        return fmt_es(value, "d")
    return str(value)


def _trainable(layout: Layout) -> int | str:
    """The parameters the adopted recipe's Phase 2 trained, as its test metrics recorded."""
    v, seed = layout.adopted
    n = load_json(layout.phase2(v, seed, "test_metrics.json")).get("trainable_parameters")
    return "no registrados" if n is None else int(n)


def _rule_level(pm: dict[str, Any]) -> float | str:
    """The level of each of the decision rule's intervals (Bonferroni over its hypotheses)."""
    level = (pm.get("rule") or {}).get("level_each")
    return "sin regla" if level is None else round(float(level), 2)


def _seeds_es(layout: Layout) -> str:
    """The training runs of the study design, in Spanish."""
    n1 = len(layout.main_runs)
    if n1 == 1:
        return f"{len(layout.seeds)} de la Fase 2 sobre una ejecución de la Fase 1"
    return (
        f"{n1} de la Fase 1 y {len(layout.seeds) // n1} de la Fase 2 sobre cada una "
        f"({len(layout.seeds)} ejecuciones por variante)"
    )


def _covers_es(layout: Layout) -> str:
    """What the intervals resample (`postmortem._covers`, in Spanish)."""
    if len(layout.main_runs) > 1:
        return (
            "semillas de la Fase 1, semillas de la Fase 2 dentro de cada una e imágenes "
            "(cada ejecución de la Fase 2 frente a su propia Fase 1)"
        )
    return (
        ("semillas de la Fase 2 e imágenes" if len(layout.seeds) > 1 else "imágenes")
        + ", condicionados a la única ejecución de la Fase 1 (su varianza de "
        "entrenamiento no está cubierta)"
    )


def settings_table(values: dict[str, Any], layout: Layout) -> Table:
    """Each setting: the thesis's (a {tesis} role in the book, its value in CSV/LaTeX) and
    this run's, from the config the run used and the files it wrote."""
    from defectfusion.model.models import PRESETS, norm_for  # torch: only this table pays for it

    thesis = _thesis_figures()
    text = load_json(layout.text)
    v, seed = layout.adopted
    pm = load_json(layout.postmortem)
    preset = PRESETS.get(layout.main)
    d_v = preset.detector.get("d_model") if preset else None
    p1, p2, fu = values["phase1"], values["phase2"], values["fusion"]
    p1_epochs = [
        f"{backbone_name_es(p, values)}: {n}" + (f" (hasta {m} si no llega antes a su meseta)" if m > n else "")
        for p, (n, m) in S.phase1_budgets(values, layout.presets).items()
    ]
    model_cfg = values.get("model") or {}
    cnn_norms = [  # models.norm_for: from random weights a CNN backbone learns its BatchNorm
        f"{backbone_name_es(p, values)}: "
        + (
            "entrenable (pesos aleatorios)"
            if norm_for(preset_setting(values, p, "model.init")) == "trainable"
            else "congelada (pesos preentrenados, como DEIMv2)"
        )
        for p in layout.presets
        if p in PRESETS and PRESETS[p].backbone["kind"] != "dinov3"
    ]
    pretrained = model_cfg.get("init") not in (None, "scratch")
    ds = S.dataset_counts(layout)
    n_images = sum(ds["splits"][s]["n_images"] for s in SPLIT_NAMES)
    weights = values["eval"]["composite_weights"]

    def row(aspect: str, aspect_en: str, thesis_es: str, thesis_en: Any, run: Any) -> dict:
        return {"aspect": aspect_en, "aspect_es": aspect, "thesis": _raw(thesis_en),
                "thesis_es": thesis_es, "run": _raw(run), "run_es": _es(run)}  # fmt: skip

    def t(key: str, spec: str = "") -> tuple[str, Any]:
        if key not in thesis:
            raise UserError(f"{THESIS_FIGURES}: no entry {key!r}")
        return (f"{{tesis}}`{key}{':' + spec if spec else ''}`", thesis[key]["value"])

    rows = [
        row("Conjunto de datos", "dataset", "privado, piezas metálicas", "private",
            f"{ds['name']} ({fmt_es(n_images, 'd')} imágenes)"),
        row("Backbone de la Fase 1", "Phase 1 backbone", "DINOv3 preentrenado",
            "DINOv3, pretrained",
            f"{layout.main}, " + ("preentrenado" if pretrained else "pesos aleatorios")),
        row("$D_v$ (consultas del decodificador)", "D_v", *t("d_v"), d_v),
        row("Codificador de texto (congelado)", "text encoder", "familia CLIP (SigLIP como "
            "alternativa)", "CLIP family",
            text_encoder_es(text.get("encoder"))),
        row("$D_t$ (incrustación de texto)", "D_t", *t("d_t"), text.get("dim")),
        row("Resolución de entrada (px)", "image size", "no indicada", "",
            values["data"]["image_size"]),
        row("Épocas de la Fase 1", "Phase 1 epochs", "no indicadas", "", "; ".join(p1_epochs)),
        row("BatchNorm de los backbones CNN", "CNN backbones' BatchNorm", "no indicada", "",
            "; ".join(cnn_norms) or "sin líneas base CNN"),
        row("Tasa de aprendizaje de la Fase 1", "Phase 1 lr", "no indicada", "", p1["lr"]),
        row("Épocas máximas de la Fase 2", "Phase 2 max epochs", *t("max_epochs"),
            p2["epochs"]),
        row("Paciencia de la Fase 2 (épocas)", "Phase 2 patience", *t("patience"),
            p2["patience"] or "sin parada temprana"),
        row("Tasa de aprendizaje de la Fase 2 (AdamW)", "Phase 2 lr", *t("lr_phase2", ".0e"),
            p2["lr"]),
        row("Fracción de la tasa de la Fase 1", "Phase 2 lr / Phase 1 lr",
            *t("lr_fraction"), round(p2["lr"] / p1["lr"], 6)),
        row("Parámetros entrenables de la Fase 2", "Phase 2 trainable parameters",
            *t("trainable_params"), _trainable(layout)),
        row("Pérdida de clasificación de la Fase 2", "Phase 2 classification loss",
            "focal", "focal",
            "focal" if fu["loss"] == "focal" else "la de DEIMv2 (MAL)"),
        row("Focal: $\\alpha_f$, $\\gamma$", "focal alpha, gamma", "no indicados", "",
            f"{_es(fu['focal_alpha'])}, {_es(fu['focal_gamma'])}"),
        row("Inicialización de la fusión", "fusion init", "arranque en cero", "zero_start",
            "arranque en cero" if fu["init"] == "zero_start" else fu["init"]),
        row("Temperatura inicial $\\tau_0$", "tau_init", *t("tau_init"), fu["tau_init"]),
        # the draft says the encoder's score head was trainable in Phase 2, not that the
        # text was fused there: its fusion there is this pipeline's reading, not a figure
        row("Fusión también en la cabeza de puntuación del codificador",
            "fusion on the encoder score head",
            "no indicado (la cabeza era entrenable)", "not stated (the head was trainable)",
            bool(fu["fuse_encoder_head"])),
        row("Pesos de la puntuación compuesta (mAP, recall crítico)", "composite weights",
            f"{t('w_map')[0]}, {t('w_crit')[0]}",
            f"{thesis['w_map']['value']}, {thesis['w_crit']['value']}",
            f"{_es(float(weights['map']))}, {_es(float(weights['critical_recall']))}"),
        row("Semillas de entrenamiento", "training seeds", "una ejecución", "one run",
            _seeds_es(layout)),
        row("Lo que cubren los intervalos", "what the intervals cover", "sin intervalos", "none",
            _covers_es(layout)),
        row("Réplicas bootstrap de las imágenes", "bootstrap replicates",
            "sin bootstrap", "none", pm.get("n_boot")),
        row("Nivel de los intervalos de confianza (%)", "CI level (%)", "sin intervalos", "none",
            pm.get("ci_level")),
        row("Nivel de cada intervalo de la regla (%, ajustado por multiplicidad)",
            "decision rule's level per hypothesis (%, adjusted)", "sin regla", "none",
            _rule_level(pm)),
        row("Semilla del remuestreo bootstrap", "bootstrap seed", "sin bootstrap", "none",
            pm.get("seed")),
    ]  # fmt: skip
    cols = [
        Col("aspect", "Setting", "s", "Aspecto"),
        Col("thesis", "Thesis", "s", "Tesis"),
        Col("run", "This run", "s", "Esta ejecución"),
    ]
    return Table(
        "Settings: the thesis's beside this run's",
        cols,
        rows,
        [
            "Thesis: its chapter 4 (thesis/thesis_figures.yaml). This run: the config it ran "
            f"with, {layout.text} and {layout.postmortem}."
        ],
        "Diferencias con la tesis: sus ajustes junto a los de esta ejecución",
        [
            "Tesis: su capítulo 4, con la marca de cifra de la tesis. Esta ejecución: la "
            "configuración con la que corrió el pipeline, el codificador de texto que registró "
            "y los ajustes del bootstrap que registró el análisis *post mortem*."
        ],
    )


# ---- DEIMv2's recipe beside this run's ---------------------------------------------------------


def _recipe() -> dict[str, Any]:
    items = _book_yaml(DEIMV2_RECIPE, "the recipe table quotes DEIMv2's recipe from it").get("items")
    if not isinstance(items, dict) or not all(isinstance(v, dict) for v in items.values()):
        raise UserError(
            f"{DEIMV2_RECIPE}: 'items' must map each item to its key, official value, source"
        )
    return items


def _recipe_value(values: dict[str, Any], key: str) -> Any:
    """This run's value of a recipe item: a dotted config path, or ``preset.NAME`` (the main
    preset's detector setting; transformers' default when the preset leaves it)."""
    main = (values.get("model") or {}).get("preset", "")
    head, _, rest = key.partition(".")
    if head == "preset":
        from transformers import Deimv2Config  # torch: only this table pays for it

        from defectfusion.model.models import PRESETS

        preset = PRESETS.get(main)
        detector = preset.detector if preset else {}
        return detector.get(rest, getattr(Deimv2Config(), rest, None))
    return preset_setting(values, main, key)  # the main preset's run: its overrides count


def recipe_rows(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Each DEIMv2 recipe item (thesis/deimv2_recipe.yaml): the official value and its source,
    this run's value, and whether it is aligned or different, with the stated reason for
    this kind of profile (``cpu`` or ``gpu``: pipeline.requires_gpu); ``reason`` None marks
    a difference nobody explained."""
    gpu = bool((values.get("pipeline") or {}).get("requires_gpu"))
    rows = []
    for name, item in _recipe().items():
        key = item.get("key")
        run = _recipe_value(values, key) if key else None
        aligned = key is not None and run == item.get("official")
        reason = None if aligned else item.get("gpu" if gpu else "cpu")
        rows.append({"item": name, "item_es": item.get("es", name), "key": key or "",
                     "official": _raw(item.get("official")),
                     "official_es": item.get("official_es", str(item.get("official"))),
                     "source": item.get("source", ""), "run": _raw(run),
                     "run_es": (", ".join(_es(v) for v in run) if isinstance(run, list)
                                else (item.get("values_es") or {}).get(run, _es(run)))
                     if key else "no configurable aquí",
                     "aligned": aligned, "reason": reason,
                     "status_es": "alineado" if aligned else f"distinto: {reason}"
                     if reason else "distinto (sin razón registrada)"})  # fmt: skip
    return rows


def recipe_table(values: dict[str, Any], layout: Layout) -> Table:
    """DEIMv2's official recipe beside this run's, item by item, with the source of each
    official value and the reason for each difference (thesis/diferencias.md)."""
    rows = recipe_rows(values)
    for r in rows:
        r["status"] = "aligned" if r["aligned"] else f"different: {r['reason'] or 'no reason'}"
    cols = [
        Col("item", "Item", "s", "Aspecto"),
        Col("official", "DEIMv2", "s", "DEIMv2 (oficial)"),
        Col("source", "Source", "s", "Fuente"),
        Col("run", "This run", "s", "Esta ejecución"),
        Col("status", "Status", "s", "Estado"),
    ]
    return Table(
        "DEIMv2's official recipe beside this run's",
        cols,
        rows,
        [f"DEIMv2: Intellindust-AI-Lab/DEIMv2, the files named ({DEIMV2_RECIPE}). This run: "
         "the config it ran with and its main preset."],  # fmt: skip
        "La receta oficial de DEIMv2 junto a la de esta ejecución",
        [
            "DEIMv2: el repositorio oficial (Intellindust-AI-Lab/DEIMv2), en los archivos que "
            f"nombra la columna Fuente ({DEIMV2_RECIPE}). Esta ejecución: la configuración con "
            "la que corrió el pipeline y su preset principal."
        ],
    )


# ---- the thesis beside this run, and the prompts -----------------------------------------------


def _seed_mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _history_loss(layout: Layout, variant: str, which: str) -> float | None:
    """Phase 2's training loss of epoch 1 (``first``) or of its last epoch (``last``), mean
    over seeds: the figures the thesis quotes for its own Phase 2."""
    out = []
    for seed in layout.seeds:
        rows = [r for r in S.read_jsonl(layout.phase2(variant, seed, "history.jsonl"))
                if r.get("loss") is not None]  # fmt: skip
        if rows:
            out.append(float((rows[0] if which == "first" else rows[-1])["loss"]))
    return _seed_mean(out)


# (thesis_figures.yaml key, English, Spanish, this run's value: a function of (pm, layout))
_BESIDE: tuple[tuple[str, str, str, Callable[[dict[str, Any], Layout], Any]], ...] = (
    ("map_phase1", "Phase 1 val mAP", "mAP de validación de la Fase 1",
     lambda pm, L: pm["phase1"]["val"]["map"]["value"]),
    ("map_epoch1_zero_start", "val mAP after Phase 2 epoch 1, zero start",
     "mAP de validación tras la época 1 de la Fase 2 (arranque en cero)",
     lambda pm, L: _p2(pm, "zero_start", "epoch1", "map")),
    ("drop", "epoch-1 change (epoch 1 - Phase 1)", "Cambio en la época 1 (época 1 − Fase 1)",
     lambda pm, L: pm["phase2"]["zero_start"]["drift"]["epoch1"]["val"]["map"]["diff"]),
    ("relative_drop", "epoch-1 change relative to Phase 1", "Cambio relativo en la época 1",
     lambda pm, L: _relative(pm["phase2"]["zero_start"]["drift"]["epoch1"]["val"]["map"]["diff"],
                             pm["phase1"]["val"]["map"]["value"])),
    ("map_naive_epoch1", "val mAP after epoch 1, naive initialisation",
     "mAP de validación tras la época 1 (inicialización ingenua)",
     lambda pm, L: _p2(pm, "naive", "epoch1", "map")),
    ("val_map_end", "val mAP at the end of Phase 2", "mAP de validación al final de la Fase 2",
     lambda pm, L: _p2(pm, "zero_start", "final", "map")),
    ("crit_recall_start", "val critical recall after epoch 1",
     "Recall crítico de validación tras la época 1",
     lambda pm, L: _p2(pm, "zero_start", "epoch1", "critical_recall")),
    ("crit_recall_end", "val critical recall at the end", "Recall crítico de validación al final",
     lambda pm, L: _p2(pm, "zero_start", "final", "critical_recall")),
    ("loss_start", "Phase 2 training loss, epoch 1", "Pérdida de entrenamiento de la Fase 2, época 1",
     lambda pm, L: _history_loss(L, "zero_start", "first")),
    ("loss_end", "Phase 2 training loss, last epoch",
     "Pérdida de entrenamiento de la Fase 2, última época",
     lambda pm, L: _history_loss(L, "zero_start", "last")),
)  # fmt: skip


# No ratio for the training losses: a loss's scale is set by how many terms, decoder layers
# and denoising groups it sums and their weights, which the thesis's script and this run do
# not share; their ratio would read as a comparison it is not.
_NO_RATIO = frozenset({"loss_start", "loss_end"})


def _relative(diff: float | None, base: float | None) -> float | None:
    return diff / base if diff is not None and base else None


def _p2(pm: dict[str, Any], variant: str, which: str, metric: str) -> float | None:
    entry = pm["phase2"].get(variant)
    return entry["values"][which]["val"][metric]["value"] if entry else None


def thesis_vs_run_rows(layout: Layout) -> list[dict[str, Any]]:
    """Each figure the thesis reports about Phase 1 and Phase 2 (thesis/thesis_figures.yaml)
    beside what this run measured in the same place, with run / thesis. The drop is the
    post-mortem's (its thesis side too: `postmortem.thesis_drop`)."""
    thesis = _thesis_figures()
    pm = load_json(layout.postmortem)
    rows = []
    derived = {"drop": pm["thesis"]["drop"],  # the post-mortem's, from the same file
               "relative_drop": _relative(pm["thesis"]["drop"], pm["thesis"]["phase1"])}
    for key, en, es, run_of in _BESIDE:
        t = derived[key] if key in derived else (thesis.get(key) or {}).get("value")
        run = run_of(pm, layout)
        ratio = run / t if run is not None and t and key not in _NO_RATIO else None
        # the book marks the thesis's own figures ({tesis}); a derived one is plain
        spec = "+3" if "drop" in key else "3"  # a change prints signed, 4 decimals
        t_es = f"{{tesis}}`{key}`" if key in thesis else fmt_es(t, spec)
        rows.append({"figure": en, "figure_es": es, "key": key, "thesis": t, "thesis_es": t_es,
                     "run": run, "run_es": fmt_es(run, spec), "ratio": ratio,
                     "ratio_es": fmt_es(ratio, "3")})  # fmt: skip
    return rows


def thesis_vs_run_table(values: dict[str, Any], layout: Layout) -> Table:
    """The thesis's figures beside this run's, and their ratio: the committee's side-by-side."""
    cols = [
        Col("figure", "Figure", "s", "Cifra"),
        Col("thesis", "Thesis", "3", "Tesis"),
        Col("run", "This run", "3", "Esta ejecución"),
        Col("ratio", "Run / thesis", "2", "Ejecución / tesis"),
    ]
    rows = thesis_vs_run_rows(layout)
    es_cols = [cols[0]] + [Col(c.key, c.header, "s", c.es, align="right") for c in cols[1:]]
    return Table(
        "The thesis's figures beside this run's",
        cols,
        rows,
        [
            f"Thesis: its private data, validation ({THESIS_FIGURES}). This run: "
            f"{layout.postmortem} (means over the Phase 2 seeds of the adopted zero start, "
            "val; the naive row: the naive variant, when run) and the Phase 2 histories "
            "(training loss). Different data and models: the ratio orients, it does not test; "
            "none for the losses, whose scale depends on the terms and weights each sums."
        ],
        "Las cifras de la tesis junto a las de esta ejecución",
        [
            "Tesis: sus datos privados, en validación (thesis/thesis_figures.yaml). Esta "
            "ejecución: medias sobre las semillas de la Fase 2 de la variante adoptada (arranque "
            "en cero), en validación; la fila de la inicialización ingenua, la variante ingenua "
            "si se ejecutó («n/d» si no). La pérdida: los historiales de entrenamiento. Datos y "
            "modelos distintos: el cociente orienta, no contrasta nada; las pérdidas no lo "
            "llevan, porque su escala depende de los términos que suma cada una y de sus pesos."
        ],
        es_columns=es_cols,
        es_rows=rows,
    )


SET_ES = {("test", "best"): "prueba, punto de control elegido",
          ("val", "epoch1"): "validación, época 1", ("val", "final"): "validación, última época"}  # fmt: skip


def _model_es(name: str) -> str:
    return "Fase 1" if name == "phase1" else variant_name_es(name)


def significant_table(values: dict[str, Any], layout: Layout) -> Table:
    """Every reported contrast whose adjusted interval excludes zero (`summary.significant`),
    by checkpoint and size: the conclusions' list."""
    pm = load_json(layout.postmortem)
    rows = []
    for c in sorted(S.significant(pm), key=lambda c: (S.SIGNIFICANT_SETS.index((c["split"],
                    c["which"])), S.SIGNIFICANT_METRICS.index(c["metric"]), c["diff"])):  # fmt: skip
        rows.append({
            "contrast": f"{c['b']} - {c['a']}",
            "contrast_es": f"{_model_es(c['b'])} − {_model_es(c['a'])}",
            "metric": c["metric"], "metric_es": METRIC_NAMES_ES[c["metric"]],
            "set": f"{c['split']}, {c['which']}", "set_es": SET_ES[c["split"], c["which"]],
            "diff": c["diff"], "ci_adjusted": c["ci_adjusted"],
            "all": c["survives_all"], "all_es": "sí" if c["survives_all"] else "no",
        })  # fmt: skip
    level = pm["rule"]["level_each"]
    n_all = S.n_reported(pm)
    cols = [
        Col("contrast", "B - A", "s", "Comparación (B − A)"),
        Col("metric", "Metric", "s", "Métrica"),
        Col("set", "Split, checkpoint", "s", "Partición y punto de control"),
        Col("diff", "Difference [adjusted CI]", "+ci", "Diferencia [IC ajustado]",
            ci_key="ci_adjusted"),
        Col("all", f"Holds over all {n_all}", "s", f"Resiste el ajuste por las {n_all}"),
    ]
    return Table(
        "Every reported difference whose adjusted interval excludes zero",
        cols,
        rows,
        [f"From {layout.postmortem}: each variant against Phase 1 and against the adopted "
         f"recipe, for {', '.join(S.SIGNIFICANT_METRICS)}, on the sets {S.SIGNIFICANT_SETS}; "
         f"intervals at the verdict's adjusted level ({level:.2f} %, Bonferroni over its "
         f"hypotheses). Last column: whether it still excludes zero with Bonferroni over all "
         f"{n_all} reported differences."],  # fmt: skip
        "Todas las diferencias con intervalo ajustado que excluye el cero",
        [
            "Cada variante frente a la Fase 1 y frente a la receta adoptada, en mAP, recall "
            "crítico y recall crítico en el punto de operación, en prueba (punto de control "
            "elegido en validación) y en validación (épocas 1 y última). Intervalos al nivel "
            f"ajustado del veredicto ({fmt_es(level, '2')} %, Bonferroni sobre sus "
            "hipótesis). La última columna dice si el intervalo sigue excluyendo el cero con "
            f"Bonferroni sobre las {n_all} diferencias que el libro da: la lista las elige "
            "entre todas ellas."
        ],
    )


def prompts_table(values: dict[str, Any], layout: Layout) -> Table:
    """The class prompts the text encoder embedded, as the run recorded them."""
    text = load_json(layout.text)
    names, prompts = text.get("class_names") or [], text.get("prompts") or []
    if len(names) != len(prompts):
        raise UserError(f"{layout.text}: {len(names)} class names but {len(prompts)} prompts")
    # the book shows each prompt as typed (code: English, fed to the encoder verbatim)
    rows = [{"class": n, "class_es": class_name_es(n), "prompt": p,
             "prompt_es": "`" + p.replace("`", "'").replace("|", "/") + "`"}
            for n, p in zip(names, prompts, strict=True)]  # fmt: skip
    cols = [Col("class", "Class", "s", "Clase"), Col("prompt", "Prompt", "s", "Descripción")]
    return Table(
        "The class prompts",
        cols,
        rows,
        [f"{text.get('prompt_file')}, embedded by {text.get('encoder')} ({layout.text})."],
        "Las descripciones de cada clase",
        [
            f"Archivo {text.get('prompt_file')}, codificado con {text_encoder_es(text.get('encoder'))}; "
            "las descripciones se escriben en inglés porque en inglés se entrenaron los "
            "codificadores de texto."
        ],
    )


# ---- the appendix: runtime per stage and the environment --------------------------------------


def runtime_table(values: dict[str, Any], layout: Layout) -> Table:
    """Each stage's wall time and peak memory; the per-seed jobs of a Phase 2 variant summed
    into one row (their seeds' count beside it), so the table fits a page or two; and the
    run's duration on the clock, which the summed times are not."""
    b = layout.benchmarks
    n = len(layout.seeds)
    per = f" ({n} semillas)" if n > 1 else ""
    # (Spanish name, English name, benchmark files, epochs)
    stages: list[tuple[str, str, list[str], int | None]] = [
        ("Datos", "data", [f"{b}/data.tsv"], None),
        ("Incrustaciones de texto", "text embeddings", [f"{b}/text_embed.tsv"], None),
    ]
    for p in layout.presets:
        h = S.read_jsonl(layout.phase1(p, "history.jsonl"))
        stages.append((f"Fase 1: {backbone_name_es(p, values, layout.main)}", f"phase1 {p}",
                       [f"{b}/phase1_{p}.tsv"], _epochs_run(h)))  # fmt: skip
    for p in layout.presets:
        stages.append((f"Evaluación, Fase 1: {backbone_name_es(p, values, layout.main)}",
                       f"evaluate phase1 {p}", [layout.eval_benchmark(p)], None))  # fmt: skip
    for v in layout.variants:
        epochs = max(_epochs_run(S.read_jsonl(layout.phase2(v, s, "history.jsonl")))
                     for s in layout.seeds)  # fmt: skip
        stages.append((f"Fase 2: {variant_name_es(v)}{per}", f"phase2 {v}",
                       [f"{b}/phase2_{v}_seed{s}.tsv" for s in layout.seeds], epochs))  # fmt: skip
    for v in layout.variants:
        stages.append((f"Evaluación y bootstrap, Fase 2: {variant_name_es(v)}{per}",
                       f"evaluate + compare {v}",
                       [f"{b}/{rule}_{v}_seed{s}.tsv" for rule in ("evaluate_phase2", "compare")
                        for s in layout.seeds], None))  # fmt: skip
    if layout.variants:
        stages.append(("Análisis *post mortem*", "postmortem", [f"{b}/postmortem.tsv"], None))
    rows = []
    total = 0.0
    for es, en, paths, epochs in stages:
        benches = [S.read_benchmark(Path(path)) for path in paths]
        known = [x for x in benches if x]
        seconds = sum(x["s"] or 0.0 for x in known) if known else None
        rss = [x["max_rss"] for x in known if x["max_rss"] is not None]
        total += seconds or 0.0
        rows.append({"stage": en, "stage_es": es, "seconds": seconds,
                     "rss": max(rss) if rss else None,
                     "epochs": epochs if epochs is not None else ""})  # fmt: skip
    rows.append({"stage": "total (summed)", "stage_es": "Suma de los tiempos", "seconds": total,
                 "rss": "", "epochs": ""})  # fmt: skip
    wall = S.end_to_end_seconds(layout)
    rows.append({"stage": "end to end (clock)", "stage_es": "De principio a fin (reloj)",
                 "seconds": wall, "rss": "", "epochs": ""})  # fmt: skip
    cols = [
        Col("stage", "Stage", "s", "Etapa"),
        Col("epochs", "Epochs", "d", "Épocas"),
        Col("seconds", "Wall s", "0", "Tiempo (s)"),
        Col("rss", "Max RSS MiB", "0", "Memoria máx. (MiB)"),
    ]
    return Table(
        "Runtime per stage (Snakemake benchmarks)",
        cols,
        rows,
        [
            f"From {b}/*.tsv, written by Snakemake for each job: wall time (a variant's seeds "
            "summed) and peak resident memory (their maximum). n/a: no benchmark file. End to "
            "end: the first job's start to the last job's end (n/a when the files' times are "
            "not the run's, e.g. after a DVC checkout)."
        ],
        "Tiempo de cada etapa de esta ejecución",
        [
            f"Medido por Snakemake en cada trabajo ({b}/*.tsv): tiempo de reloj (sumado sobre "
            "las semillas de cada variante) y memoria residente máxima. n/d: sin archivo de "
            "medida. La suma de los tiempos no es la duración (los trabajos independientes "
            "corren a la vez; entre un trabajo y otro hay esperas): esta es la última fila, "
            "del comienzo del primer "
            "trabajo al final del último (n/d si las horas de los archivos no son las de la "
            "ejecución, por ejemplo tras un dvc pull)."
        ],
    )


LIBRARIES = (
    "defectfusion", "torch", "torchvision", "transformers", "sentence-transformers",
    "accelerate", "numpy", "pycocotools", "faster-coco-eval", "matplotlib", "snakemake",
    "dvc", "jupyter-book", "sphinx", "sphinxcontrib-bibtex", "weasyprint",
)  # fmt: skip


def environment_table(values: dict[str, Any], layout: Layout) -> Table:
    """The library versions that ran (importlib.metadata) beside requirements.lock's pins:
    a reader installs the locked set, and sees here whether the run used it."""
    import platform
    from importlib import metadata

    from packaging.utils import canonicalize_name


    lock_path = Path(LOCK_FILE)
    locked = read_lock(lock_path) if lock_path.is_file() else {}
    rows = [{"library": "Python", "version": platform.python_version(), "locked": None}]
    for name in LIBRARIES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = None
        pin = locked.get(canonicalize_name(name))
        rows.append(
            {
                "library": name,
                "version": version,
                "version_es": version or "no instalada",
                "locked": pin,
                "locked_es": pin or ("-" if name != "defectfusion" else "esta copia"),
            }
        )
    cols = [
        Col("library", "Library", "s", "Biblioteca"),
        Col("version", "Version", "s", "Versión"),
        Col("locked", f"In {LOCK_FILE}", "s", f"En {LOCK_FILE}"),
    ]
    return Table(
        "Versions of the main libraries",
        cols,
        rows,
        [
            "The Python environment that ran the report stage (the pipeline's environment), "
            f"beside the pins of {LOCK_FILE} (`pip install -r {LOCK_FILE}` installs them)."
        ],
        "Versiones de las bibliotecas principales",
        [
            "El entorno de Python que ejecutó la etapa de informe, el mismo del resto del "
            f"pipeline, junto a las versiones fijadas en {LOCK_FILE}, que instala "
            f"`pip install -r {LOCK_FILE}`."
        ],
    )


BUILDERS: dict[str, Callable[[dict[str, Any], Layout], Table]] = {
    "dataset": dataset_table,
    "phase1": phase1_table,
    "phase2": phase2_table,
    "per_class_recall": per_class_recall_table,
    "settings": settings_table,
    "recipe": recipe_table,
    "thesis_vs_run": thesis_vs_run_table,
    "prompts": prompts_table,
    "significant": significant_table,
    "phase1_detail": phase1_detail_table,
    "phase2_detail": phase2_detail_table,
    "runtime": runtime_table,
    "environment": environment_table,
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
    names, layout = chosen(values, only, "tables", results)
    params = prov.params_subset(values, PARAM_SECTIONS)
    written: list[Path] = []
    for name in names:
        record = prov.make_record(
            f"tables/{name}",
            rule,
            params,
            inputs_of(layout, "tables", name),
            optional_inputs_of(layout, "tables", name),
        )
        texts = render(BUILDERS[name](values, layout), record)
        paths = [atomic_write_text(Path(out) / f"{name}.{ext}", t) for ext, t in texts.items()]
        prov.write_sidecar(results, record, paths)
        written += paths
    return written
