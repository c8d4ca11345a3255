# Report: tables, figures and summary.json (each with its provenance), and the book.
# Included by the Snakefile, whose names (config, P, REPORT, code_deps, section,
# resolved...) these rules use; paths are relative to the working directory.


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
        report("results/tables/{table}.csv", caption="../report/table.rst", category="Tables"),
        multiext("results/tables/{table}", ".md", ".tex"),
        sidecar="results/provenance/tables/{table}.json",
    input:
        lambda w: inputs_of(REPORT, "tables", w.table),
        lambda w: optional_inputs_of(REPORT, "tables", w.table),
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
        report("figures/{figure}.png", caption="../report/figure.rst", category="Figures"),
        "figures/{figure}.pdf",
        sidecar="results/provenance/figures/{figure}.json",
    input:
        lambda w: inputs_of(REPORT, "figures", w.figure),
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
        inputs_of(REPORT, "summary", "summary"),
        optional_inputs_of(REPORT, "summary", "summary"),  # each job's time: the run's duration
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
