# Data: the dataset's three splits, and the class prompts' text embeddings.
# Included by the Snakefile, whose names (config, P, REPORT, code_deps, section,
# resolved...) these rules use; paths are relative to the working directory.


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
        code_deps("defectfusion.model.text"),
    params:
        section("text"),
        config=resolved,
    log:
        "logs/text_embed.log",
    benchmark:
        "benchmarks/results/text_embed.tsv"
    shell:
        "defectfusion text embed --config {params.config:q} --out {output.embeddings:q} > {log:q} 2>&1"
