# The pipeline: data -> text embeddings -> Phase 1 per preset -> Phase 2 per variant and
# seed -> evaluation on the test split -> paired bootstrap comparisons.
# Rules are thin: each calls the `defectfusion` CLI. params.yaml is the single source of
# hyperparameters; a profile is an overlay: snakemake --cores all --configfile configs/micro.yaml
import os
import shutil
import sys
from pathlib import Path


configfile: "params.yaml"

# `snakemake --report report.html`: every figure and table, with its caption (report/*.rst).
report: "report/workflow.rst"


def typed_config():
    """The resolved config checked once, every section typed (defectfusion/config.py): a bad
    key or value stops the run before anything reads it, in one line naming it. Snakemake's
    `--config` hands values inside a mapping over as text ('false', '3'): those take their
    typed value here, so the workflow and its jobs read the same thing."""
    from defectfusion.config import checked_config, with_typed_text
    from defectfusion.errors import UserError

    try:
        cfg = checked_config(config, "the run's config (params.yaml, --configfile, --config)")
    except UserError as e:
        sys.exit(f"defectfusion: {e}")  # one line, no Snakemake traceback
    return with_typed_text(config, cfg.to_dict())


config.update(typed_config())
P = config["pipeline"]


def resolved_config_file(values):
    """The config Snakemake resolved (params.yaml, every --configfile, every --config), written
    once under .snakemake/ and named by its content: every job reads exactly what Snakemake
    was told, and jobs of two different runs never share a file."""
    import hashlib
    import json

    from defectfusion.fsutil import atomic_write_text

    text = json.dumps(values, sort_keys=True, indent=1)  # JSON is YAML: the CLI reads it
    path = Path(".snakemake/defectfusion") / f"config-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return str(path)


CONFIG = resolved_config_file(config)


def resolved(wildcards, output):
    """Every job's `--config`: the resolved config's path. A param derived from the outputs,
    so Snakemake leaves it out of its rerun check (the file's name changes with any value):
    a rule reruns when its `section(...)` params, the values it reads, change. Config values
    are untrusted text (a profile from a shared remote): shell commands quote them (`:q`)."""
    return CONFIG
from defectfusion.pipeline import code_deps  # each rule's code: what its stage imports
from defectfusion.config import variant_settings
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
from defectfusion.report import CAPTIONS, FIGURES, PARAM_SECTIONS, TABLES, Layout, output

REPORT = Layout.from_config(config)
# The study design (pipeline.phase1_seeds): the main preset's Phase 1 once per seed, its runs
# runs/phase1/MAIN (the config's seed) and MAIN_seedK; each Phase 2 seed fine-tunes the run
# REPORT.phase1_run_of(seed). By default one run, MAIN.
MAIN_RUNS = list(REPORT.main_runs)
PHASE1_RUNS = list(REPORT.phase1_runs)




def preflight_problem():
    """What this profile needs and this machine lacks (None when nothing): checked before any
    work, so a run never stops halfway for a missing dataset, GPU or weights."""
    from defectfusion.config import phase1_seeds_problem

    if (problem := phase1_seeds_problem(config)):
        return problem
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
        # each preset's own weights (a CNN baseline's backbone; timm names allowed)
        *(
            weights_problem(f"pipeline.preset_overrides.{p}.model.weights", o["model.weights"], names_ok=True)
            for p, o in P["preset_overrides"].items()
            if p in PRESETS and isinstance(o, dict) and "model.weights" in o
        ),
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


def canonical(value):
    """A param as Snakemake should compare it: dict keys sorted, recursively. Snakemake records
    a param's repr, so the same values in another key order (params.yaml after `pipeline
    use-profile` merged an overlay into it) would count as a change and rerun everything."""
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def section(*keys):
    """The params a rule depends on: Snakemake reruns it when they change, and only then."""
    return canonical({k: config[k] for k in keys})


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
# (defectfusion/pipeline.py says when that is possible).
onsuccess:
    from defectfusion.pipeline import record_in_dvc_lock

    print(record_in_dvc_lock(config))


rule data:
    output:
        SPLITS,
    input:
        code_deps("defectfusion.data"),
        # an imported dataset's source: a newer folder or annotations file remakes the data
        [P["dataset"][k] for k in ("src", "annotations") if P["dataset"].get(k)],
    params:
        dataset=canonical(P["dataset"]),
        size=config["data"]["image_size"],
        out=lambda w, output: str(Path(output[0]).parents[1]),  # DATA, from its outputs
        config=resolved,
    log:
        "logs/data.log",
    benchmark:
        "benchmarks/results/data.tsv"
    shell:
        "defectfusion data prepare --config {params.config:q} --out {params.out:q} > {log:q} 2>&1"


rule text_embed:
    output:
        embeddings="results/text/embeddings.pt",
        meta="results/text/embeddings.json",
    input:
        SPLITS[0],
        config["text"]["prompts"],
        code_deps("defectfusion.text"),
    params:
        section("text"),
        config=resolved,
    log:
        "logs/text_embed.log",
    benchmark:
        "benchmarks/results/text_embed.tsv"
    shell:
        "defectfusion text embed --config {params.config:q} --out {output.embeddings:q} > {log:q} 2>&1"


rule phase1:
    output:
        ckpt="runs/phase1/{preset}/best.pt",
        raw="runs/phase1/{preset}/best_raw.pt",  # the same epoch's raw weights (EMA: best.pt)
        history="results/phase1/{preset}/history.jsonl",
        history_csv="results/phase1/{preset}/history.csv",  # for `dvc plots`
    input:
        TRAIN_SPLITS,
        code_deps("defectfusion.train.phase1"),
    params:
        cfg=section("seed", "data", "model", "phase1", "eval"),
        overrides=lambda w: canonical(P["preset_overrides"].get(REPORT.run_preset(w.preset)[0], {})),
        # the folder's preset and seed (MAIN_seedK: the main preset at Phase 1 seed K)
        preset=lambda w: REPORT.run_preset(w.preset)[0],
        seed=lambda w: REPORT.run_preset(w.preset)[1],
        config=resolved,
    resources:
        gpu=GPUS,
    # The main model is the critical path (every Phase 2 run waits for it): it starts first,
    # on every core; the CNN baselines, whose results only the report reads, then share the
    # cores with the Phase 2 jobs, one thread each.
    priority: lambda w: 10 if w.preset in MAIN_RUNS else 0
    threads: lambda w: workflow.cores if w.preset in MAIN_RUNS else 1
    log:
        "logs/phase1/{preset}.log",
    benchmark:
        "benchmarks/results/phase1_{preset}.tsv"
    shell:
        f"{TRAIN} phase1 "
        "--config {params.config:q} --preset {params.preset:q} --set seed={params.seed:q} "
        "--out runs/phase1/{wildcards.preset:q} --resume > {log:q} 2>&1 && "
        "cp runs/phase1/{wildcards.preset:q}/history.jsonl {output.history:q} && "
        "cp runs/phase1/{wildcards.preset:q}/history.csv {output.history_csv:q}"


rule evaluate_phase1:
    output:
        metrics="results/phase1/{preset}/{split}_metrics.json",
        predictions="results/phase1/{preset}/{split}_metrics.predictions.json",
        headline="results/metrics/phase1/{preset}_{split}.json",  # what `dvc metrics show` lists
    input:
        ckpt="runs/phase1/{preset}/best.pt",
        split=f"{DATA}/annotations/{{split}}.json",
        code=code_deps("defectfusion.evaluate"),
    params:
        section("data", "eval"),
        config=resolved,
    wildcard_constraints:
        split="test|val",
    log:
        "logs/evaluate/phase1_{preset}_{split}.log",
    benchmark:
        "benchmarks/results/evaluate_phase1_{preset}_{split}.tsv"
    shell:
        "defectfusion evaluate --checkpoint {input.ckpt:q} --data {input.split:q} --out {output.metrics:q} "
        "--headline {output.headline:q} --config {params.config:q} > {log:q} 2>&1"


# Phase 2 keeps, besides the val-selected best.pt, the eval weights of epoch 1 and of the last
# epoch and the val predictions of epochs 0, 1 and the last: the post-mortem's drift.
PHASE2_VAL = ("val_epoch0", "val_epoch1", "val_final")


rule phase2:
    output:
        ckpt="runs/phase2/{variant}/seed{seed}/best.pt",
        epoch1="runs/phase2/{variant}/seed{seed}/epoch1.pt",
        final="runs/phase2/{variant}/seed{seed}/final.pt",
        history="results/phase2/{variant}/seed{seed}/history.jsonl",
        steps="results/phase2/{variant}/seed{seed}/steps.jsonl",
        history_csv="results/phase2/{variant}/seed{seed}/history.csv",
        val=expand("results/phase2/{{variant}}/seed{{seed}}/{name}.predictions.json", name=PHASE2_VAL),
    input:
        TRAIN_SPLITS,
        # the Phase 1 run this seed fine-tunes (MAIN unless pipeline.phase1_seeds)
        phase1=lambda w: f"runs/phase1/{REPORT.phase1_run_of(w.seed)}/best.pt",
        phase1_raw=lambda w: f"runs/phase1/{REPORT.phase1_run_of(w.seed)}/best_raw.pt",
        text="results/text/embeddings.pt",
        code=code_deps("defectfusion.train.phase2"),
    params:
        cfg=section("seed", "data", "model", "phase1", "phase2", "eval", "text", "fusion"),
        variant=lambda w: canonical(variant_settings(P, w.variant)),
        # the job's folders, from its outputs
        run=lambda w, output: str(Path(output.ckpt).parent),
        results=lambda w, output: str(Path(output.history).parent),
        config=resolved,
    resources:
        gpu=GPUS,
    # One thread each: Phase 2's steps are small (a decoder over cached features), so two
    # single-threaded jobs side by side do more per second than one job on two threads; they
    # share the cache (cache.build_lock: the first builds it, the others wait and reuse it).
    threads: 1
    log:
        "logs/phase2/{variant}_seed{seed}.log",
    benchmark:
        "benchmarks/results/phase2_{variant}_seed{seed}.tsv"
    shell:
        f"{TRAIN} phase2 "
        "--config {params.config:q} --variant {wildcards.variant:q} --set seed={wildcards.seed:q} "
        "--phase1 {input.phase1:q} --text {input.text:q} --out {params.run:q} --resume > {log:q} 2>&1 && "
        "for f in history.jsonl history.csv steps.jsonl val_epoch0.predictions.json "
        "val_epoch1.predictions.json val_final.predictions.json; do "
        'cp {params.run:q}/"$f" {params.results:q}/"$f"; done'


# Test metrics of Phase 2's val-selected best.pt (test_metrics), of epoch 1 and of the last
# epoch, in one job (the model is built once).
PHASE2_TEST = {"metrics": "best", "epoch1": "epoch1", "final": "final"}


rule evaluate_phase2:
    output:
        expand(
            "results/phase2/{{variant}}/seed{{seed}}/test_{which}{ext}",
            which=PHASE2_TEST, ext=(".json", ".predictions.json"),
        ),
        # the val-selected checkpoint's headline numbers: what `dvc metrics show` lists
        headline="results/metrics/phase2/{variant}_seed{seed}.json",
    input:
        ckpt=expand("runs/phase2/{{variant}}/seed{{seed}}/{c}.pt", c=PHASE2_TEST.values()),
        split=SPLITS[2],
        code=code_deps("defectfusion.evaluate"),
    params:
        section("data", "eval"),
        out=expand("results/phase2/{{variant}}/seed{{seed}}/test_{which}.json", which=PHASE2_TEST),
        config=resolved,
    log:
        "logs/evaluate/phase2_{variant}_seed{seed}.log",
    benchmark:
        "benchmarks/results/evaluate_phase2_{variant}_seed{seed}.tsv"
    shell:
        "defectfusion evaluate --checkpoint {input.ckpt:q} --data {input.split:q} "
        "--out {params.out:q} --headline {output.headline:q} --config {params.config:q} > {log:q} 2>&1"


rule compare:
    output:
        "results/compare/{variant}_seed{seed}.json",
    input:
        a=lambda w: f"results/phase1/{REPORT.phase1_run_of(w.seed)}/test_metrics.json",
        b="results/phase2/{variant}/seed{seed}/test_metrics.json",
        split=SPLITS[2],
        code=code_deps("defectfusion.compare"),
    params:
        n=P["bootstrap"],
        cfg=section("data", "eval"),
        config=resolved,
    log:
        "logs/compare/{variant}_seed{seed}.log",
    benchmark:
        "benchmarks/results/compare_{variant}_seed{seed}.tsv"
    shell:
        "defectfusion compare --a {input.a:q} --b {input.b:q} --data {input.split:q} --out {output:q} "
        "--n-boot {params.n:q} --seed {wildcards.seed:q} --config {params.config:q} > {log:q} 2>&1"


# The post-mortem (issue 13): per variant, the epoch-1 and last-epoch drift from Phase 1 (val
# and test), the contrasts with Phase 1 and with the adopted variant, and a verdict per
# hypothesis, with intervals over the Phase 2 seeds and the images (hierarchical bootstrap).
# One job: every prediction set is matched once and shares the replicates.
rule postmortem:
    output:
        "results/postmortem.json",
    input:
        REPORT.postmortem_inputs(),
        "thesis/thesis_figures.yaml",  # the thesis's epoch-1 drop, beside each verdict
        code=code_deps("defectfusion.postmortem"),
    params:
        cfg=section("seed", "data", "eval", "postmortem"),  # postmortem: the decision rule
        pipe=canonical({k: P[k] for k in ("variants", "seeds", "phase1_seeds", "bootstrap")}),
        switches=canonical({v: P["variant_switches"][v] for v in VARIANTS}),
        config=resolved,
    threads: lambda w: workflow.cores  # a lambda: --report and --rulegraph set no --cores
    log:
        "logs/postmortem.log",
    benchmark:
        "benchmarks/results/postmortem.tsv"
    shell:
        "defectfusion postmortem --config {params.config:q} --out {output:q} --jobs {threads} > {log:q} 2>&1"


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
        "thesis/_build/libro.pdf",  # the same book printed by WeasyPrint (report/book.py)
    input:
        "results/summary.json",
        BOOK_TABLES,
        BOOK_FIGURES,
        BOOK_SOURCES,
        code_deps("defectfusion.report.book"),
    log:
        "logs/book.log",
    benchmark:
        "benchmarks/results/book.tsv"
    shell:
        "defectfusion book --results results --figures figures --out thesis/_build --pdf "
        "> {log:q} 2>&1"


# ---- report: tables, figures and summary.json, each with its provenance --------------------
# One job per table and per figure, so only the outputs whose inputs changed are rebuilt;
# each writes a sidecar results/provenance/KIND/NAME.json, and `provenance` indexes them
# (no job writes a shared file). Inputs come from Layout.inputs: exactly the files read.


rule table:
    output:
        report("results/tables/{table}.csv", caption="report/table.rst", category="Tables"),
        multiext("results/tables/{table}", ".md", ".tex"),
        sidecar="results/provenance/tables/{table}.json",
    input:
        lambda w: REPORT.inputs("tables", w.table),
        lambda w: REPORT.optional_inputs("tables", w.table),
        code_deps("defectfusion.report.tables"),
    params:
        section(*PARAM_SECTIONS),
        config=resolved,
        caption=lambda w: CAPTIONS[w.table],  # the report's caption (report/table.rst)
    wildcard_constraints:
        table="|".join(TABLES),
    log:
        "logs/report/table_{table}.log",
    benchmark:
        "benchmarks/results/report_table_{table}.tsv"
    shell:
        "defectfusion report tables --config {params.config:q} --only {wildcards.table:q} --out results/tables "
        "--rule table > {log:q} 2>&1"


rule figure:
    output:
        report("figures/{figure}.png", caption="report/figure.rst", category="Figures"),
        "figures/{figure}.pdf",
        sidecar="results/provenance/figures/{figure}.json",
    input:
        lambda w: REPORT.inputs("figures", w.figure),
        # this figure's module (and what it imports): editing one figure redraws that one
        lambda w: code_deps(output("figures", w.figure).module),
    params:
        section(*PARAM_SECTIONS),
        # this figure's style only: restyling one figure redraws that figure alone
        style=lambda w: canonical(config.get("figure_style", {}).get(w.figure, {})),
        config=resolved,
        caption=lambda w: CAPTIONS[w.figure],  # the report's caption (report/figure.rst)
    wildcard_constraints:
        figure="|".join(FIGURES),
    log:
        "logs/report/figure_{figure}.log",
    benchmark:
        "benchmarks/results/report_figure_{figure}.tsv"
    shell:
        "defectfusion report figures --config {params.config:q} --only {wildcards.figure:q} "
        "--out figures --rule figure > {log:q} 2>&1"


rule summary:
    output:
        summary="results/summary.json",
        sidecar="results/provenance/summary/summary.json",
    input:
        REPORT.inputs("summary", "summary"),
        REPORT.optional_inputs("summary", "summary"),  # each job's time: the run's duration
        code_deps("defectfusion.report.summary"),
    params:
        section(*PARAM_SECTIONS),
        config=resolved,
    log:
        "logs/report/summary.log",
    benchmark:
        "benchmarks/results/report_summary.tsv"
    shell:
        "defectfusion report summary --config {params.config:q} --out {output.summary:q} --rule summary > {log:q} 2>&1"


rule provenance:
    output:
        "results/provenance.json",
    input:
        sidecars=[
            *expand("results/provenance/tables/{table}.json", table=TABLES),
            *expand("results/provenance/figures/{figure}.json", figure=FIGURES),
            "results/provenance/summary/summary.json",
        ],
        code=code_deps("defectfusion.report.provenance"),
    log:
        "logs/report/provenance.log",
    shell:
        "defectfusion report provenance {input.sidecars:q} --out {output:q} > {log:q} 2>&1"
