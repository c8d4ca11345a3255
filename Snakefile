# The pipeline: data -> text embeddings -> Phase 1 per preset -> Phase 2 per variant and
# seed -> evaluation on the test split -> paired bootstrap comparisons and the post-mortem ->
# tables, figures and the book. Rules are thin: each calls the `defectfusion` CLI; they live
# in rules/*.smk (data, train, analysis, report), their helpers in defectfusion.workflow and
# defectfusion.layout. params.yaml is the single source of hyperparameters; a profile is an
# overlay: snakemake --cores all --configfile configs/micro.yaml
import sys
from pathlib import Path

from defectfusion.config import variant_settings
from defectfusion.core.errors import UserError
from defectfusion.workflow.code_deps import code_deps
from defectfusion.workflow.preflight import (
    canonical, preflight_problem, resolved_config_file, typed_config
)
from defectfusion.report import (
    CAPTIONS, FIGURES, PARAM_SECTIONS, TABLES, Layout, inputs_of, optional_inputs_of, output
)


configfile: "params.yaml"

# `snakemake --report report.html`: every figure and table, with its caption (report/*.rst).
report: "report/workflow.rst"

# The config checked and typed once, and what this machine lacks (a dataset, a GPU, weights)
# checked before any work: one line and a non-zero exit (a WorkflowError would add
# Snakemake's traceback lines).
try:
    config.update(typed_config(config))
    problem = preflight_problem(config)
except UserError as e:
    problem = str(e)
if problem:
    sys.exit(f"defectfusion: {problem}")

P = config["pipeline"]
# Every job's `--config` is the resolved config's path. `resolved` is a param derived from the
# outputs, so Snakemake leaves it out of its rerun check (the file's name changes with any
# value): a rule reruns when its `section(...)` params, the values it reads, change. Config
# values are untrusted text (a profile from a shared remote): shell commands quote them (`:q`).
CONFIG = resolved_config_file(config)
resolved = lambda wildcards, output: CONFIG


# The params a rule depends on: Snakemake reruns it when they change, and only then.
section = lambda *keys: canonical({k: config[k] for k in keys})


DATA = config["data"]["dir"]
PRESETS = P["presets"]
VARIANTS = list(P["variants"])
SEEDS = P["seeds"]
SPLITS = [f"{DATA}/annotations/{s}.json" for s in ("train", "val", "test")]
TRAIN_SPLITS = SPLITS[:2]  # training never reads the test split
# Training jobs: pipeline.gpus GPUs each; more than one runs the trainer under torchrun
# (accelerate's DDP: the global batch is split over the processes).
GPUS = int(P.get("gpus", 1)) if P["requires_gpu"] else 0
TRAIN = (
    f"torchrun --standalone --nproc-per-node {GPUS} -m defectfusion.cli train"
    if GPUS > 1 else "defectfusion train"
)
# Where every result lives (defectfusion/layout.py), and which files each report output reads.
REPORT = Layout.from_config(config)
# The study design (pipeline.phase1_seeds): the main preset's Phase 1 once per seed, its runs
# runs/phase1/MAIN (the config's seed) and MAIN_seedK; each Phase 2 seed fine-tunes the run
# REPORT.phase1_run_of(seed). By default one run, MAIN.
MAIN_RUNS = list(REPORT.main_runs)
PHASE1_RUNS = list(REPORT.phase1_runs)

# Targets only: on a cluster they run where Snakemake runs, not as jobs.
localrules: all, trained

# The trained state: data, text embeddings, checkpoints and training histories. Targets of
# `all` too: Snakemake does not remake a deleted file whose consumers are up to date, and DVC
# versions these, so a checkpoint deleted by hand must be a missing target (remade, and
# dvc.lock never records the run without it), not a silently absent intermediate.
TRAINED = [
    *SPLITS,
    "results/text/embeddings.pt",
    *expand("runs/phase1/{preset}/best.pt", preset=PHASE1_RUNS),
    *expand("results/phase1/{preset}/history.jsonl", preset=PHASE1_RUNS),
    *expand("runs/phase2/{variant}/seed{seed}/best.pt", variant=VARIANTS, seed=SEEDS),
    *expand(
        "results/phase2/{variant}/seed{seed}/{f}.jsonl",
        variant=VARIANTS, seed=SEEDS, f=("history", "steps"),
    ),
]


rule all:
    input:
        TRAINED,
        expand("results/phase1/{preset}/test_metrics.json", preset=PHASE1_RUNS),
        expand("results/phase1/{run}/val_metrics.json", run=MAIN_RUNS),
        expand(
            "results/phase2/{variant}/seed{seed}/test_{which}.json",
            variant=VARIANTS, seed=SEEDS, which=("metrics", "epoch1", "final"),
        ),
        expand("results/compare/{variant}_seed{seed}.json", variant=VARIANTS, seed=SEEDS),
        "results/postmortem.json",
        expand("results/tables/{table}.{ext}", table=TABLES, ext=("csv", "md", "tex")),
        expand("figures/{figure}.{ext}", figure=FIGURES, ext=("png", "pdf")),
        "results/summary.json",
        "results/provenance.json",
        "thesis/_build/html/index.html",


# The trained state: `defectfusion pipeline rebuild` marks it up to date after `dvc pull`
# (`snakemake --touch trained`), so a rebuild from pulled checkpoints trains nothing.
rule trained:
    input:
        TRAINED,


# After a successful run, record it in dvc.lock so `dvc repro` does not redo it
# (defectfusion/workflow/versioning.py says when that is possible).
onsuccess:
    from defectfusion.workflow.versioning import record_in_dvc_lock

    print(record_in_dvc_lock(config))


include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/analysis.smk"
include: "rules/report.smk"
