# Analysis: each checkpoint's test metrics, the paired comparisons and the post-mortem.
# Included by the Snakefile, whose names (config, P, REPORT, code_deps, section,
# resolved...) these rules use; paths are relative to the working directory.


rule evaluate_phase1:
    output:
        metrics="results/phase1/{preset}/{split}_metrics.json",
        predictions="results/phase1/{preset}/{split}_metrics.predictions.json",
        headline="results/metrics/phase1/{preset}_{split}.json",  # what `dvc metrics show` lists
    input:
        ckpt="runs/phase1/{preset}/best.pt",
        split=f"{DATA}/annotations/{{split}}.json",
        code=code_deps("defectfusion.evaluation.evaluate"),
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
        code=code_deps("defectfusion.evaluation.evaluate"),
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
        code=code_deps("defectfusion.analysis.compare"),
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
        code=code_deps("defectfusion.analysis.postmortem"),
    params:
        cfg=section("seed", "data", "eval", "postmortem"),  # postmortem: the decision rule
        pipe=canonical({k: P[k] for k in ("variants", "seeds", "phase1_seeds", "bootstrap",
                                          "coverage_trials")}),
        switches=canonical({v: P["variant_switches"][v] for v in VARIANTS}),
        config=resolved,
    threads: lambda w: workflow.cores  # a lambda: --report and --rulegraph set no --cores
    log:
        "logs/postmortem.log",
    benchmark:
        "benchmarks/results/postmortem.tsv"
    shell:
        "defectfusion postmortem --config {params.config:q} --out {output:q} --jobs {threads} > {log:q} 2>&1"
