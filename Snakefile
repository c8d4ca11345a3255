# The pipeline: data -> text embeddings -> Phase 1 per preset -> Phase 2 per variant and
# seed -> evaluation on the test split -> paired bootstrap comparisons.
# Rules are thin: each calls the `defectfusion` CLI. params.yaml is the single source of
# hyperparameters; a profile is an overlay: snakemake --cores all --configfile configs/micro.yaml
import os
import shutil
import sys
from pathlib import Path


configfile: "params.yaml"

P = config["pipeline"]
CONFIGS = " ".join(["params.yaml", *P.get("overlays", [])])
CODE = "code/defectfusion"
DATA = config["data"]["dir"]
PRESETS = P["presets"]
MAIN = config["model"]["preset"]
VARIANTS = list(P["variants"])
SEEDS = P["seeds"]
SPLITS = [f"{DATA}/annotations/{s}.json" for s in ("train", "val", "test")]
# Training jobs: pipeline.gpus GPUs each; more than one runs the trainer under torchrun
# (accelerate's DDP: the global batch is split over the processes).
GPUS = int(P.get("gpus", 1)) if P["requires_gpu"] else 0
TRAIN = (
    f"torchrun --standalone --nproc-per-node {GPUS} -m defectfusion.cli train"
    if GPUS > 1 else "defectfusion train"
)
TRAIN_SPLITS = SPLITS[:2]  # training never reads the test split

# The report stage's outputs and the results files each one reads (defectfusion/report).
from defectfusion.report import FIGURES, PARAM_SECTIONS, TABLES, Layout

REPORT = Layout.from_config(config)




def preflight_problem():
    """What this profile needs and this machine lacks (None when nothing): checked before any
    work, so a run never stops halfway for a missing dataset, GPU or weights."""
    d = P["dataset"]
    if d["kind"] in ("neu", "coco") and not (d.get("src") and Path(d["src"]).exists()):
        return (
            f"profile needs pipeline.dataset.src (the {d['kind']} images folder); got {d.get('src')!r}. "
            "Set it in the profile or with --config 'pipeline={\"dataset\": {\"src\": \"DIR\"}}'"
        )
    if d["kind"] == "coco" and not (d.get("annotations") and Path(d["annotations"]).is_file()):
        return f"profile needs pipeline.dataset.annotations (a COCO JSON); got {d.get('annotations')!r}"
    from defectfusion.pipeline import weights_problem

    for problem in (
        weights_problem("model.weights", config["model"].get("weights")),
        weights_problem("text.weights", config["text"].get("weights"), names_ok=True),
    ):
        if problem:
            return problem
    if P["requires_gpu"] and shutil.which("nvidia-smi") is None and not os.environ.get("DEFECTFUSION_ALLOW_CPU"):
        return (
            "this profile trains on a GPU and none is visible (nvidia-smi not found); "
            "run it on a GPU machine (profiles/slurm for a cluster) or set DEFECTFUSION_ALLOW_CPU=1"
        )
    return None


# One line and a non-zero exit (a WorkflowError would add Snakemake's traceback lines).
if (problem := preflight_problem()):
    sys.exit(f"defectfusion: {problem}")


def section(*keys):
    """The params a rule depends on: Snakemake reruns it when they change, and only then."""
    return {k: config[k] for k in keys}


# Targets only: on a cluster they run where Snakemake runs, not as jobs.
localrules: all, trained


rule all:
    input:
        expand("results/phase1/{preset}/test_metrics.json", preset=PRESETS),
        expand("results/phase2/{variant}/seed{seed}/test_metrics.json", variant=VARIANTS, seed=SEEDS),
        expand("results/compare/{variant}_seed{seed}.json", variant=VARIANTS, seed=SEEDS),
        expand("results/tables/{table}.{ext}", table=TABLES, ext=("csv", "md", "tex")),
        expand("figures/{figure}.{ext}", figure=FIGURES, ext=("png", "pdf")),
        "results/summary.json",
        "results/provenance.json",
        "thesis/_build/html/index.html",


# The trained state (what `dvc pull` gives the committee): `defectfusion pipeline touch
# trained` marks it up to date, so a rebuild from pulled checkpoints trains nothing.
rule trained:
    input:
        SPLITS,
        "results/text/embeddings.pt",
        expand("runs/phase1/{preset}/best.pt", preset=PRESETS),
        expand("results/phase1/{preset}/history.jsonl", preset=PRESETS),
        expand("runs/phase2/{variant}/seed{seed}/best.pt", variant=VARIANTS, seed=SEEDS),
        expand(
            "results/phase2/{variant}/seed{seed}/{f}.jsonl",
            variant=VARIANTS, seed=SEEDS, f=("history", "steps"),
        ),


# After a successful run, record it in dvc.lock so `dvc repro` does not redo it
# (defectfusion/pipeline.py says when that is possible).
onsuccess:
    from defectfusion.pipeline import record_in_dvc_lock

    print(record_in_dvc_lock(config))


rule data:
    output:
        SPLITS,
    input:
        f"{CODE}/data/__init__.py",
        f"{CODE}/data/synth.py",
        f"{CODE}/data/importers.py",
        # an imported dataset's source: a newer folder or annotations file remakes the data
        [P["dataset"][k] for k in ("src", "annotations") if P["dataset"].get(k)],
    params:
        dataset=P["dataset"],
        size=config["data"]["image_size"],
    log:
        "logs/data.log",
    benchmark:
        "benchmarks/results/data.tsv"
    shell:
        "defectfusion data prepare --config {CONFIGS} --out {DATA} > {log} 2>&1"


rule text_embed:
    output:
        "results/text/embeddings.pt",
        "results/text/embeddings.json",
    input:
        SPLITS[0],
        config["text"]["prompts"],
        f"{CODE}/text.py",
    params:
        section("text"),
    log:
        "logs/text_embed.log",
    benchmark:
        "benchmarks/results/text_embed.tsv"
    shell:
        "defectfusion text embed --config {CONFIGS} --out {output[0]} > {log} 2>&1"


rule phase1:
    output:
        ckpt="runs/phase1/{preset}/best.pt",
        history="results/phase1/{preset}/history.jsonl",
    input:
        TRAIN_SPLITS,
        f"{CODE}/train/phase1.py",
        f"{CODE}/train/engine.py",
        f"{CODE}/models.py",
        f"{CODE}/losses.py",
    params:
        cfg=section("seed", "data", "model", "phase1", "eval"),
        overrides=lambda w: P["preset_overrides"].get(w.preset, {}),
    resources:
        gpu=GPUS,
    threads: workflow.cores
    log:
        "logs/phase1/{preset}.log",
    benchmark:
        "benchmarks/results/phase1_{preset}.tsv"
    shell:
        f"{TRAIN} phase1 "
        "--config {CONFIGS} --preset {wildcards.preset} "
        "--out runs/phase1/{wildcards.preset} --resume > {log} 2>&1 && "
        "cp runs/phase1/{wildcards.preset}/history.jsonl {output.history}"


rule evaluate_phase1:
    output:
        "results/phase1/{preset}/test_metrics.json",
        "results/phase1/{preset}/test_metrics.predictions.json",
    input:
        ckpt="runs/phase1/{preset}/best.pt",
        split=SPLITS[2],
        code=f"{CODE}/evaluate.py",
    params:
        section("data", "eval"),
    log:
        "logs/evaluate/phase1_{preset}.log",
    benchmark:
        "benchmarks/results/evaluate_phase1_{preset}.tsv"
    shell:
        "defectfusion evaluate --checkpoint {input.ckpt} --data {input.split} --out {output[0]} "
        "--config {CONFIGS} > {log} 2>&1"


rule phase2:
    output:
        ckpt="runs/phase2/{variant}/seed{seed}/best.pt",
        history="results/phase2/{variant}/seed{seed}/history.jsonl",
        steps="results/phase2/{variant}/seed{seed}/steps.jsonl",
    input:
        TRAIN_SPLITS,
        phase1=f"runs/phase1/{MAIN}/best.pt",
        text="results/text/embeddings.pt",
        code=[f"{CODE}/train/phase2.py", f"{CODE}/fusion.py", f"{CODE}/train/engine.py", f"{CODE}/losses.py"],
    params:
        cfg=section("seed", "data", "model", "phase2", "eval", "text", "fusion"),
        variant=lambda w: {**P["variants"][w.variant], **P["variant_overrides"].get(w.variant, {})},
    resources:
        gpu=GPUS,
    threads: workflow.cores
    log:
        "logs/phase2/{variant}_seed{seed}.log",
    benchmark:
        "benchmarks/results/phase2_{variant}_seed{seed}.tsv"
    shell:
        f"{TRAIN} phase2 "
        "--config {CONFIGS} --variant {wildcards.variant} --set seed={wildcards.seed} "
        "--phase1 {input.phase1} --out runs/phase2/{wildcards.variant}/seed{wildcards.seed} --resume > {log} 2>&1 && "
        "cp runs/phase2/{wildcards.variant}/seed{wildcards.seed}/history.jsonl {output.history} && "
        "cp runs/phase2/{wildcards.variant}/seed{wildcards.seed}/steps.jsonl {output.steps}"


rule evaluate_phase2:
    output:
        "results/phase2/{variant}/seed{seed}/test_metrics.json",
        "results/phase2/{variant}/seed{seed}/test_metrics.predictions.json",
    input:
        ckpt="runs/phase2/{variant}/seed{seed}/best.pt",
        split=SPLITS[2],
        code=f"{CODE}/evaluate.py",
    params:
        section("data", "eval"),
    log:
        "logs/evaluate/phase2_{variant}_seed{seed}.log",
    benchmark:
        "benchmarks/results/evaluate_phase2_{variant}_seed{seed}.tsv"
    shell:
        "defectfusion evaluate --checkpoint {input.ckpt} --data {input.split} --out {output[0]} "
        "--config {CONFIGS} > {log} 2>&1"


rule compare:
    output:
        "results/compare/{variant}_seed{seed}.json",
    input:
        a=f"results/phase1/{MAIN}/test_metrics.json",
        b="results/phase2/{variant}/seed{seed}/test_metrics.json",
        split=SPLITS[2],
        code=f"{CODE}/compare.py",
    params:
        n=P["bootstrap"],
        cfg=section("data", "eval"),
    log:
        "logs/compare/{variant}_seed{seed}.log",
    benchmark:
        "benchmarks/results/compare_{variant}_seed{seed}.tsv"
    shell:
        "defectfusion compare --a {input.a} --b {input.b} --data {input.split} --out {output} "
        "--n-boot {params.n} --seed {wildcards.seed} --config {CONFIGS} > {log} 2>&1"


# The thesis book reads only what the report stage wrote; its own sources are inputs too,
# so editing a page rebuilds it (not __pycache__, which importing the extension writes).
from defectfusion import report as _report

BOOK_TABLES = expand("results/tables/{t}.md", t=_report.TABLES)
BOOK_FIGURES = expand("figures/{f}.png", f=_report.FIGURES)
BOOK_SOURCES = sorted(
    str(p) for p in Path("thesis").rglob("*")
    if p.is_file() and not {"_build", "__pycache__"} & set(p.parts)
)


rule book:
    output:
        "thesis/_build/html/index.html",
    input:
        "results/summary.json",
        BOOK_TABLES,
        BOOK_FIGURES,
        BOOK_SOURCES,
        f"{CODE}/report/book.py",
    log:
        "logs/book.log",
    benchmark:
        "benchmarks/results/book.tsv"
    shell:
        "defectfusion book --results results --figures figures --out thesis/_build > {log} 2>&1"


# ---- report: tables, figures and summary.json, each with its provenance --------------------
# One job per table and per figure, so only the outputs whose inputs changed are rebuilt;
# each writes a sidecar results/provenance/KIND/NAME.json, and `provenance` indexes them
# (no job writes a shared file). Inputs come from Layout.inputs: exactly the files read.
REPORT_CODE = [f"{CODE}/report/__init__.py", f"{CODE}/report/provenance.py", f"{CODE}/report/summary.py"]


rule table:
    output:
        multiext("results/tables/{table}", ".csv", ".md", ".tex"),
        sidecar="results/provenance/tables/{table}.json",
    input:
        lambda w: REPORT.inputs("tables", w.table),
        lambda w: REPORT.optional_inputs("tables", w.table),
        REPORT_CODE,
        f"{CODE}/report/tables.py",
    params:
        section(*PARAM_SECTIONS),
    wildcard_constraints:
        table="|".join(TABLES),
    log:
        "logs/report/table_{table}.log",
    benchmark:
        "benchmarks/results/report_table_{table}.tsv"
    shell:
        "defectfusion report tables --config {CONFIGS} --only {wildcards.table} --out results/tables "
        "--rule {rule} > {log} 2>&1"


rule figure:
    output:
        multiext("figures/{figure}", ".png", ".pdf"),
        sidecar="results/provenance/figures/{figure}.json",
    input:
        lambda w: REPORT.inputs("figures", w.figure),
        REPORT_CODE,
        f"{CODE}/report/figures.py",
    params:
        section(*PARAM_SECTIONS),
        # this figure's style only: restyling one figure redraws that figure alone
        style=lambda w: config.get("figure_style", {}).get(w.figure, {}),
    wildcard_constraints:
        figure="|".join(FIGURES),
    log:
        "logs/report/figure_{figure}.log",
    benchmark:
        "benchmarks/results/report_figure_{figure}.tsv"
    shell:
        "defectfusion report figures --config {CONFIGS} --only {wildcards.figure} "
        "--out figures --rule {rule} > {log} 2>&1"


rule summary:
    output:
        "results/summary.json",
        sidecar="results/provenance/summary/summary.json",
    input:
        REPORT.inputs("summary", "summary"),
        REPORT_CODE,
    params:
        section(*PARAM_SECTIONS),
    log:
        "logs/report/summary.log",
    benchmark:
        "benchmarks/results/report_summary.tsv"
    shell:
        "defectfusion report summary --config {CONFIGS} --out {output[0]} --rule {rule} > {log} 2>&1"


rule provenance:
    output:
        "results/provenance.json",
    input:
        sidecars=[
            *expand("results/provenance/tables/{table}.json", table=TABLES),
            *expand("results/provenance/figures/{figure}.json", figure=FIGURES),
            "results/provenance/summary/summary.json",
        ],
        code=f"{CODE}/report/provenance.py",
    log:
        "logs/report/provenance.log",
    shell:
        "defectfusion report provenance {input.sidecars} --out {output} > {log} 2>&1"
