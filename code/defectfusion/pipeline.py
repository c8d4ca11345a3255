"""What Snakemake (the runner) and DVC (the versioning of data, checkpoints and results)
cannot do for each other, and the pipeline's helpers: preflight, profiles, code dependencies,
the rule graph.

The graph is declared once, in the Snakefile; dvc.yaml has one stage that runs Snakemake with
persistent outputs (Snakemake reruns what a change affects). Two things remain to join:

- after `snakemake`, :func:`record_in_dvc_lock` (the Snakefile's ``onsuccess``) runs
  `dvc commit`, so `dvc status` is clean and `dvc repro` finds nothing to redo;
- after `dvc pull`, :func:`rebuild` (the committee's path) marks the pulled trained state up to
  date and rebuilds evaluation, tables, figures and book from the checkpoints.

Neither tool knows the other (DVC has no Snakemake integration), so this is written here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from defectfusion.config import read_yaml
from defectfusion.errors import UserError

# The Snakemake rules whose outputs are the trained state: data, text embeddings, checkpoints.
TRAINED_RULES = ("data", "text_embed", "phase1", "phase2")
# Snakemake rules the committee reruns from the checkpoints (and everything after them).
REBUILT_RULES = ("evaluate_phase1", "evaluate_phase2")


def _run(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise UserError(f"{cmd[0]} not found on PATH; install the project (pip install -e .)")
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        detail = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1] if lines else "")
        raise UserError(f"{what} failed ({' '.join(cmd[:3])} ...): {detail}")
    return r


# ---- preflight (the Snakefile imports this module: keep it free of torch) ----------------


def weights_problem(key: str, weights: str | None, names_ok: bool = False) -> str | None:
    """Why `weights` (a hub id or a local path, config key `key`) cannot load, or None.

    For the pipeline's preflight, before any work: a local path must exist; a hub id must be
    in the local hub cache when the hub is offline (HF_HUB_OFFLINE=1). Online, a hub id that
    is not cached yet downloads on first use, so it passes. `names_ok`: other names are
    allowed too (open_clip's pretrained tags such as ``openai``), only paths are checked.
    """
    if not weights:
        return None
    path = Path(str(weights)).expanduser()
    if path.exists():
        return None
    looks_local = str(weights).startswith(("/", "./", "../", "~"))
    if looks_local or (not names_ok and str(weights).count("/") != 1):
        return f"{key}={weights!r}: no such file or folder (and not a hub id ORG/NAME)"
    if names_ok:
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(str(weights), "config.json"), str):
            return (
                f"{key}={weights!r}: not in the local hub cache and HF_HUB_OFFLINE is set; "
                f"run `hf download {weights}` where there is internet, or point {key} at a folder"
            )
    return None


def preflight_problem(config: dict[str, Any]) -> str | None:
    """What this run's config needs and this machine lacks (None when nothing): the
    Snakefile checks it before any work, so a run never stops halfway for a missing dataset,
    GPU or weights."""
    from defectfusion.config import DATASET_KINDS, phase1_seeds_problem

    if problem := phase1_seeds_problem(config):
        return problem
    p = config["pipeline"]
    d = p["dataset"]
    needs = DATASET_KINDS.get(d["kind"], ())
    if "src" in needs and not (d.get("src") and Path(d["src"]).exists()):
        return (
            f"profile needs pipeline.dataset.src (the {d['kind']} images folder); got "
            f"{d.get('src')!r}. Set it in the profile or with "
            "--config 'pipeline={\"dataset\": {\"src\": \"DIR\"}}'"
        )
    if "annotations" in needs and not (d.get("annotations") and Path(d["annotations"]).is_file()):
        return (
            "profile needs pipeline.dataset.annotations (a COCO JSON); got "
            f"{d.get('annotations')!r}"
        )
    for problem in (
        weights_problem("model.weights", config["model"].get("weights")),
        weights_problem("text.weights", config["text"].get("weights"), names_ok=True),
        # each preset's own weights (a CNN baseline's backbone; timm names allowed)
        *(
            weights_problem(
                f"pipeline.preset_overrides.{name}.model.weights", o["model.weights"], True
            )
            for name, o in p["preset_overrides"].items()
            if name in p["presets"] and isinstance(o, dict) and "model.weights" in o
        ),
    ):
        if problem:
            return problem
    if (
        p["requires_gpu"]
        and shutil.which("nvidia-smi") is None
        and not os.environ.get("DEFECTFUSION_ALLOW_CPU")
    ):
        return (
            "this profile trains on a GPU and none is visible (nvidia-smi not found); run it "
            "on a GPU machine (profiles/slurm for a cluster) or set DEFECTFUSION_ALLOW_CPU=1"
        )
    return None


# ---- what the Snakefile hands its jobs -------------------------------------------------------


def typed_config(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config checked once, every section typed (config.py): a bad key or value
    stops the run before anything reads it, in one line naming it (a UserError). Snakemake's
    `--config` hands values inside a mapping over as text ('false', '3'): those take their
    typed value here, so the workflow and its jobs read the same thing."""
    from defectfusion.config import checked_config, with_typed_text

    cfg = checked_config(config, "the run's config (params.yaml, --configfile, --config)")
    return with_typed_text(config, cfg.to_dict())


def resolved_config_file(values: dict[str, Any]) -> str:
    """The config Snakemake resolved (params.yaml, every --configfile, every --config),
    written once under .snakemake/ and named by its content: every job reads exactly what
    Snakemake was told, and jobs of two different runs never share a file."""
    import hashlib
    import json

    from defectfusion.fsutil import atomic_write_text

    text = json.dumps(values, sort_keys=True, indent=1)  # JSON is YAML: the CLI reads it
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = Path(".snakemake/defectfusion") / f"config-{digest}.yaml"
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return str(path)


def canonical(value: Any) -> Any:
    """A param as Snakemake should compare it: dict keys sorted, recursively. Snakemake
    records a param's repr, so the same values in another key order (params.yaml after
    `pipeline use-profile` merged an overlay into it) would count as a change and rerun
    everything."""
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


# ---- Snakemake -> DVC ----------------------------------------------------------------------


def record_in_dvc_lock(config: dict[str, Any], root: str | Path = ".") -> str:
    """Record a finished Snakemake run in dvc.lock (`dvc commit`); return what was done.

    Only a complete run of params.yaml as it is can be recorded: dvc.lock pairs all the
    stage's outputs with the params.yaml values, so a run with `--configfile`/`--config`
    overlays is not (use `defectfusion pipeline use-profile` to make a profile params.yaml's
    own), nor one that left jobs to do (a run of some targets only).
    """
    root = Path(root)
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        return "dvc.lock: no DVC repository here; nothing recorded"
    if os.environ.get("DVC_STAGE"):
        return "dvc.lock: run by `dvc repro`, which records it itself"
    if read_yaml(root / "params.yaml") != config:
        return (
            "dvc.lock not updated: this run's config differs from params.yaml (a --configfile "
            "or --config overlay); `defectfusion pipeline use-profile FILE` makes it params.yaml's"
        )
    # dvc.lock vouches for the whole stage: a run of one target (the book, say) after a value
    # changed must not record the other outputs as made with it.
    try:
        left = planned_jobs(root)
    except UserError as e:  # Snakemake cannot even plan: nothing to vouch for
        return f"dvc.lock not updated: {e}"
    if left:
        return (
            "dvc.lock not updated: the workflow still has jobs to run (a run of some targets "
            "only?); `snakemake --cores all` records it when everything is up to date"
        )
    missing = missing_outputs(root)
    if missing:  # never vouch for an output that is not there
        return (
            f"dvc.lock not updated: {len(missing)} output(s) missing, e.g. {missing[0]}; "
            "`defectfusion pipeline remake-missing` (or `dvc repro`) remakes them"
        )
    r = subprocess.run(
        ["dvc", "commit", "--force", "--quiet"], cwd=root, capture_output=True, text=True
    )
    if r.returncode:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"dvc.lock not updated (some stage's outputs are missing?): {last}"
    return "dvc.lock updated: `dvc repro` will not redo this run's work"


def missing_outputs(root: str | Path = ".") -> list[str]:
    """Outputs of the workflow's jobs that are not on disk (`snakemake --summary`'s status
    "missing"), benchmark files aside (a job's timing record: missing, it is not a reason to
    retrain). Snakemake does not remake a deleted file whose consumers are up to date, so
    neither it nor DVC would otherwise notice, and dvc.lock would record the run without it."""
    r = _run(["snakemake", "--cores", "1", "--summary"], Path(root), "listing the outputs")
    missing = []
    for line in r.stdout.splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) >= 5 and cols[4] == "missing" and not cols[0].startswith("benchmarks/"):
            missing.append(cols[0])
    return missing


def remake_missing(root: str | Path = ".", cores: str = "all") -> list[str]:
    """Ask Snakemake for every missing output by name (a missing target is remade; what
    reads it then reruns in the next full run, its input being newer). The DVC stage runs
    this between its two passes. Returns what was missing."""
    missing = missing_outputs(root)
    if missing:
        print(f"remaking {len(missing)} missing output(s), e.g. {missing[0]}", flush=True)
        _stream(["snakemake", "--cores", cores, "--quiet", "rules", "--", *missing], Path(root))
    return missing


def job_counts(output: str) -> dict[str, int]:
    """The jobs in Snakemake's job-stats tables, by rule; empty when there was nothing to do.
    A dry run prints its table twice and `dvc repro`'s two passes one each: a rule's count is
    the last one printed, never a sum."""
    counts: dict[str, int] = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("job", "rule", "total"):
            counts[parts[0]] = int(parts[1])
    return counts


def planned_jobs(root: str | Path = ".", *args: str) -> dict[str, int]:
    """The jobs `snakemake -n ARGS` would run in `root`, by rule."""
    r = _run(
        ["snakemake", "--cores", "1", "-n", "--quiet", "rules", *args], Path(root), "planning"
    )
    return job_counts(r.stdout + r.stderr)


# ---- profiles under DVC ----------------------------------------------------------------------


def use_profile(profile: str | Path, params: str | Path = "params.yaml") -> list[str]:
    """Write a profile overlay's values into params.yaml, keeping its comments.

    DVC reads hyperparameters from params.yaml only, so a run that DVC versions (the thesis
    run whose checkpoints the committee pulls) must have its profile there. Returns the
    dotted keys that changed.
    """
    from ruamel.yaml import YAML

    overlay = read_yaml(profile)
    base = read_yaml(params)  # a missing or malformed params.yaml: one line, before any write
    if not isinstance(overlay, dict) or not isinstance(overlay.get("pipeline", {}), dict):
        raise UserError(f"{profile}: a profile is a mapping of sections (its pipeline too)")
    # The merged values must be a config the pipeline accepts (types, ranges, known keys):
    # checked before params.yaml is touched, so a bad profile writes nothing.
    from defectfusion.config import checked_config, deep_merge

    checked_config(deep_merge(base, overlay), f"{profile} over {params}")
    rt = YAML()  # round-trip: comments and key order of params.yaml survive
    rt.preserve_quotes = True
    params = Path(params)
    doc = rt.load(params.read_text(encoding="utf-8"))
    changed: list[str] = []

    def merge(node: Any, over: dict[str, Any], prefix: str) -> None:
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                merge(node[key], value, f"{prefix}{key}.")
            elif node.get(key) != value:
                node[key] = value
                changed.append(f"{prefix}{key}")

    merge(doc, overlay, "")
    pipe = doc.setdefault("pipeline", {})
    pipe["profile"] = str(overlay.get("pipeline", {}).get("profile") or Path(profile).stem)

    from defectfusion.fsutil import atomic_write

    atomic_write(params, lambda tmp: rt.dump(doc, tmp))
    return changed


# ---- after a checkout: Snakemake decides by time, DVC restores by content --------------------


def mark_up_to_date(root: str | Path = ".", targets: tuple[str, ...] = ()) -> None:
    """Tell Snakemake that the existing outputs of the jobs making `targets` (default: all)
    are up to date: `snakemake --touch --forceall`, which touches them in dependency order,
    plus the jobs' benchmark files, which Snakemake 9 counts among a job's outputs when it
    takes their oldest time but --touch leaves alone (the job would still look outdated).
    Touching every benchmark file is safe: a job's oldest output is then one of its others.
    Fails when an output is missing."""
    root = Path(root)
    _run(
        ["snakemake", "--cores", "1", "--touch", "--forceall", "--quiet", "all", "--", *targets],
        root,
        "marking the outputs up to date (is a file of the run missing?)",
    )
    for tsv in (root / "benchmarks/results").glob("*.tsv"):
        os.utime(tsv)


# ---- the committee's path: pull the checkpoints, rebuild everything after them -------------


def rebuild(root: str | Path = ".", cores: str = "all", remote: str | None = None) -> None:
    """`dvc pull` a versioned run, then rebuild evaluation, tables, figures and book.

    Nothing is trained. DVC restores files by content, with whatever times the checkout gives,
    and Snakemake decides by time, so the pulled trained state is first marked up to date
    (`snakemake --touch`, in dependency order); evaluation and all that follows then rerun
    from the pulled checkpoints.
    """
    root = Path(root)
    if not (root / "dvc.lock").is_file():
        raise UserError(
            f"{root / 'dvc.lock'}: not found; the committee's path needs a trained, committed "
            "run (run `snakemake --cores all` and commit dvc.lock, then `dvc push`)"
        )
    pull = ["dvc", "pull", *(["--remote", remote] if remote else [])]
    print(f"1/3 {' '.join(pull)}", flush=True)
    _run(pull, root, "pulling the run")
    mark_up_to_date(root, ("trained",))
    print("2/3 marked the pulled data, embeddings and checkpoints up to date", flush=True)
    rerun = ["--forcerun", *REBUILT_RULES]
    planned = planned_jobs(root, *rerun)
    for rule in TRAINED_RULES:
        if rule in planned:
            raise UserError(f"rebuild would rerun {rule}: the pulled state is incomplete")
    print(f"3/3 snakemake --cores {cores} {' '.join(rerun)}", flush=True)
    _stream(["snakemake", "--cores", cores, *rerun], root)
    print(f"rebuilt: {root / 'results'}, {root / 'figures'}, {root / 'thesis/_build/html'}")


def _stream(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd)  # not captured: the user watches Snakemake's progress
    if r.returncode:
        raise UserError(f"{' '.join(cmd)} failed (exit {r.returncode}); see its output above")


# ---- the rule graph, drawn for the README ----------------------------------------------------


def rulegraph_edges(dot: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Rule names and (upstream, downstream) edges of `snakemake --rulegraph`'s DOT."""
    import pydot

    graphs = pydot.graph_from_dot_data(dot)
    if not graphs:
        raise UserError("rulegraph: not a DOT graph")
    g = graphs[0]
    label = {}
    for n in g.get_nodes():
        name = n.get_name().strip('"')
        lab = (n.get_attributes().get("label") or "").strip('"')
        if name not in ("node", "edge", "graph") and lab:
            label[name] = lab
    edges = sorted(
        {
            (label[e.get_source().strip('"')], label[e.get_destination().strip('"')])
            for e in g.get_edges()
        }
    )
    return sorted(label.values()), edges


def draw_rulegraph(dot: str, out: str | Path) -> Path:
    """Draw the rule graph left to right by depth (graphviz, which would lay it out, is not a
    Python package). Direct dependencies are dark; ones also implied through another rule
    (data -> table, say) are faint, so the stages read in order and no edge is dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    nodes, edges = rulegraph_edges(dot)
    g = nx.DiGraph()
    g.add_nodes_from(nodes)
    g.add_edges_from(edges)
    direct = set(nx.transitive_reduction(g).edges())
    layers = list(nx.topological_generations(g))
    pos: dict[str, tuple[float, float]] = {}
    for x, layer in enumerate(layers):
        for i, name in enumerate(sorted(layer)):
            pos[name] = (x * 2.0, ((len(layer) - 1) / 2 - i) * 1.1)
    height = max(len(layer) for layer in layers)
    fig, ax = plt.subplots(figsize=(1.45 * len(layers) + 0.6, 0.75 * height + 0.9))
    for faint in (True, False):
        nx.draw_networkx_edges(
            g, pos, ax=ax,
            edgelist=[e for e in g.edges() if (e not in direct) == faint],
            arrows=True, arrowstyle="-|>", arrowsize=10, node_size=2300, node_shape="s",
            edge_color="#d0d0d0" if faint else "#555555", width=0.8 if faint else 1.4,
            connectionstyle="arc3,rad=0.08",
        )  # fmt: skip
    for name, (x, y) in pos.items():
        ax.text(
            x, y, name, ha="center", va="center", fontsize=8.5, zorder=3,
            bbox={"boxstyle": "round,pad=0.35", "fc": "#e8f0fa", "ec": "#3b6ea5"},
        )  # fmt: skip
    xs, ys = [x for x, _ in pos.values()], [y for _, y in pos.values()]
    ax.set_xlim(min(xs) - 0.9, max(xs) + 0.9)
    ax.set_ylim(min(ys) - 0.6, max(ys) + 0.6)
    ax.set_axis_off()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    return out


def write_rulegraph(out: str | Path, root: str | Path = ".") -> tuple[Path, Path]:
    """`snakemake --rulegraph` of the workflow in `root`: OUT.dot (the text) and OUT (drawn)."""
    r = _run(["snakemake", "--cores", "1", "--rulegraph"], Path(root), "snakemake --rulegraph")
    dot = r.stdout[r.stdout.index("digraph") :]
    out = Path(out)
    dot_path = out.with_suffix(".dot")
    from defectfusion.fsutil import atomic_write_text

    atomic_write_text(dot_path, dot)
    return dot_path, draw_rulegraph(dot, out)


# ---- code dependencies, derived from the imports ---------------------------------------------

PACKAGE = "defectfusion"


def _module_file(module: str, root: Path) -> Path | None:
    """The source file of a `defectfusion...` module under `root` (the folder holding the
    package), or None when it is not one of the package's modules."""
    parts = module.split(".")
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str, top_level: bool = False) -> set[str]:
    """The `defectfusion` modules a source file imports, at any depth (function-level
    imports too: the package imports its heavy stages lazily), or at its top level only."""
    import ast

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body if top_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            if name.split(".")[0] != PACKAGE:
                continue
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)  # may name submodules
    return found


def code_deps(*modules: str, root: str | Path = "code") -> list[str]:
    """The source files a rule runs: `modules`, every `defectfusion` module they import,
    transitively, and the packages' ``__init__`` files on the way, as paths under `root`.

    Rules declare these as inputs, so a change to any code a step runs (the augmentations in
    data/loader.py, the metric in evaluate.py) reruns that step and nothing else. Found by
    parsing (no import: the Snakefile stays free of torch).
    """
    root = Path(root)
    seen: dict[str, Path] = {}
    parents: dict[str, Path] = {}
    todo: list[tuple[str, bool]] = [(m, False) for m in modules]
    while todo:
        name, as_parent = todo.pop()
        if name in seen or (as_parent and name in parents):
            continue
        path = _module_file(name, root)
        if path is None:
            continue  # a function or class imported from a module, not a module
        (parents if as_parent else seen)[name] = path
        parts = name.split(".")
        # Importing a module runs its parent packages' __init__ (their top level only: a
        # function in __init__ that imports lazily is not called by importing a submodule).
        todo += [(".".join(parts[:i]), True) for i in range(1, len(parts))]
        todo += [(m, False) for m in sorted(_imports(path, name, top_level=as_parent))]
    return sorted(str(p) for p in {*seen.values(), *parents.values()})
