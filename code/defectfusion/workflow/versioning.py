"""What Snakemake (the runner) and DVC (the versioning of data, checkpoints and results)
cannot do for each other.

The graph is declared once, in the Snakefile; dvc.yaml has one stage that runs Snakemake with
persistent outputs (Snakemake reruns what a change affects). Two things remain to join:

- after `snakemake`, :func:`record_in_dvc_lock` (the Snakefile's ``onsuccess``) runs
  `dvc commit`, so `dvc status` is clean and `dvc repro` finds nothing to redo;
- after `dvc pull`, :func:`rebuild` (the committee's path) marks the pulled trained state up to
  date and rebuilds evaluation, tables, figures and book from the checkpoints.

Neither tool knows the other (DVC has no Snakemake integration), so this is written here. A
profile made params.yaml's (`use_profile`) is here too: params.yaml is what DVC records.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from defectfusion.config import checked_config, deep_merge, read_yaml
from defectfusion.core.errors import UserError
from defectfusion.core.fsutil import atomic_write
from defectfusion.workflow.jobs import planned_jobs, run_command, stream_command

# The Snakemake rules whose outputs are the trained state: data, text embeddings, checkpoints.
TRAINED_RULES = ("data", "text_embed", "phase1", "phase2")


# Snakemake rules the committee reruns from the checkpoints (and everything after them).
REBUILT_RULES = ("evaluate_phase1", "evaluate_phase2")


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
    r = run_command(["snakemake", "--cores", "1", "--summary"], Path(root), "listing the outputs")
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
        stream_command(["snakemake", "--cores", cores, "--quiet", "rules", "--", *missing], Path(root))
    return missing


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


    atomic_write(params, lambda tmp: rt.dump(doc, tmp))
    return changed


def mark_up_to_date(root: str | Path = ".", targets: tuple[str, ...] = ()) -> None:
    """Tell Snakemake that the existing outputs of the jobs making `targets` (default: all)
    are up to date: `snakemake --touch --forceall`, which touches them in dependency order,
    plus the jobs' benchmark files, which Snakemake 9 counts among a job's outputs when it
    takes their oldest time but --touch leaves alone (the job would still look outdated).
    Touching every benchmark file is safe: a job's oldest output is then one of its others.
    Fails when an output is missing."""
    root = Path(root)
    run_command(
        ["snakemake", "--cores", "1", "--touch", "--forceall", "--quiet", "all", "--", *targets],
        root,
        "marking the outputs up to date (is a file of the run missing?)",
    )
    for tsv in (root / "benchmarks/results").glob("*.tsv"):
        os.utime(tsv)


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
    run_command(pull, root, "pulling the run")
    mark_up_to_date(root, ("trained",))
    print("2/3 marked the pulled data, embeddings and checkpoints up to date", flush=True)
    rerun = ["--forcerun", *REBUILT_RULES]
    planned = planned_jobs(root, *rerun)
    for rule in TRAINED_RULES:
        if rule in planned:
            raise UserError(f"rebuild would rerun {rule}: the pulled state is incomplete")
    print(f"3/3 snakemake --cores {cores} {' '.join(rerun)}", flush=True)
    stream_command(["snakemake", "--cores", cores, *rerun], root)
    print(f"rebuilt: {root / 'results'}, {root / 'figures'}, {root / 'thesis/_build/html'}")
