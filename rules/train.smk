# Training: Phase 1 per preset (and per Phase 1 seed), Phase 2 per variant and seed.
# Included by the Snakefile, whose names (config, P, REPORT, code_deps, section,
# resolved...) these rules use; paths are relative to the working directory.


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
