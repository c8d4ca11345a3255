"""What the Snakefile checks and resolves while it parses: the run's config typed and
validated (`typed_config`), the problems to stop on before any job starts
(`preflight_problem`: weights that are not there, a dataset source that is missing), and the
resolved config written once for the jobs (`resolved_config_file`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from defectfusion.config import DATASET_KINDS, checked_config, phase1_seeds_problem, with_typed_text
from defectfusion.core.fsutil import atomic_write_text


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


def typed_config(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config checked once, every section typed (config.py): a bad key or value
    stops the run before anything reads it, in one line naming it (a UserError). Snakemake's
    `--config` hands values inside a mapping over as text ('false', '3'): those take their
    typed value here, so the workflow and its jobs read the same thing."""

    cfg = checked_config(config, "the run's config (params.yaml, --configfile, --config)")
    return with_typed_text(config, cfg.to_dict())


def resolved_config_file(values: dict[str, Any]) -> str:
    """The config Snakemake resolved (params.yaml, every --configfile, every --config),
    written once under .snakemake/ and named by its content: every job reads exactly what
    Snakemake was told, and jobs of two different runs never share a file."""
    import hashlib
    import json


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
