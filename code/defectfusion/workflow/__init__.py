"""The workflow around the code: what the Snakefile asks while it parses (`preflight`,
`code_deps`), running Snakemake (`jobs`), joining it with DVC (`versioning`) and drawing its
rule graph (`rulegraph`). Above everything but the command line: the Snakefile and the CLI
use it; no analysis or report code imports it."""
