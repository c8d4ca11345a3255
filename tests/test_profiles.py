"""Every shipped GPU profile runs end to end on a CPU, shrunk, before a GPU hour is spent on it.

Each profile (configs/thesis.yaml, configs/neu.yaml) runs through Snakemake exactly as a user
starts it (`--configfile configs/PROFILE.yaml`), with one overlay that only shrinks it: a
handful of generated images in the profile's own dataset format, one epoch, 128 px, one
seed, two Phase 2 variants. Everything else is the profile's: its presets (the CNN
baselines included, each with its own weights), its initialisation from hub weights, its
text encoder (open_clip's ViT-B-32 under the OpenAI tag), its prompts and the report. The
weights are stand-ins (tests/standins.py): random, in the formats and at the hub
names users will have, resolved offline from a local hub cache, so every loading path runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import copy_workflow
from standins import make as make_standins
from standins import tiny_coco, tiny_neu

SIZE = 128  # the GPU presets pick 300 queries: 128 px has 336 anchors (96 px: 189)
PROFILES = ("thesis", "neu")


def shrink(profile: str, data: Path, work: Path) -> dict:
    """The overlay that shrinks `profile` and nothing else (its presets, weights, text
    encoder, prompts and recipe stay the profile's)."""
    values = yaml.safe_load((work / "configs" / f"{profile}.yaml").read_text())
    prompts = yaml.safe_load((work / values["text"]["prompts"]).read_text())["classes"]
    names = [prompts[k]["name"] for k in sorted(prompts)]
    dataset = dict(values["pipeline"]["dataset"])
    if dataset["kind"] == "coco":
        images, ann = tiny_coco(data, names)
        dataset.update(src=str(images), annotations=str(ann))
    else:
        dataset.update(src=str(tiny_neu(data, names)))
    # two Phase 1 epochs: the book judges the plateau (one epoch has no gain to judge)
    small = {"epochs": 2, "batch_size": 4, "warmup_steps": 2, "patience": 0}
    return {
        "data": {"image_size": SIZE, "num_workers": 0},
        "phase1": small,
        "phase2": {**small, "cache_views": 1},
        "eval": {"batch_size": 8},
        "pipeline": {"dataset": dataset, "seeds": [0], "bootstrap": 20, "requires_gpu": False,
                     "variants": ["zero_start", "thesis_replica"]},  # fmt: skip
    }


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_standins(tmp_path_factory.mktemp("hub"))


@pytest.mark.parametrize("profile", PROFILES)
def test_a_gpu_profile_runs_end_to_end_shrunk(
    profile: str, standins: Path, tmp_path: Path
) -> None:
    import subprocess

    (tmp_path / "work").mkdir()
    work = copy_workflow(tmp_path / "work")
    overlay = shrink(profile, tmp_path / "data", work)
    (work / "configs" / "shrunk.yaml").write_text(yaml.safe_dump(overlay))
    env = {**os.environ, "HF_HUB_CACHE": str(standins), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home")}  # fmt: skip
    out = subprocess.run(
        ["snakemake", "--cores", "2", "--configfile", f"configs/{profile}.yaml",
         "configs/shrunk.yaml"],
        cwd=work, capture_output=True, text=True, timeout=1800, env=env,
    )  # fmt: skip
    logs = "\n".join(
        f"--- {p.relative_to(work)}\n{p.read_text(errors='replace')[-1500:]}"
        for p in sorted((work / "logs").rglob("*.log"))
        if "rror" in p.read_text(errors="replace")
    ) if (work / "logs").is_dir() else ""  # fmt: skip
    assert out.returncode == 0, (out.stderr[-3000:], logs[-6000:])
    summary = json.loads((work / "results" / "summary.json").read_text())
    assert summary["run"]["profile"].startswith(profile)
    # every preset trained from its own stand-in weights, and the CLIP encoder was used
    values = yaml.safe_load((work / "configs" / f"{profile}.yaml").read_text())
    for preset in values["pipeline"]["presets"]:
        meta = json.loads((work / "results" / "phase1" / preset / "history.jsonl").read_text()
                          .splitlines()[-1])  # fmt: skip
        assert meta["epoch"] == overlay["phase1"]["epochs"], preset
    text = json.loads((work / "results" / "text" / "embeddings.json").read_text())
    assert text["encoder"] == "clip-vit-b-32" and text["dim"] == 512
    assert (work / "results" / "tables" / "recipe.md").is_file()


def test_the_gpu_check_runs_at_toy_size(tmp_path: Path) -> None:
    """benchmarks/gpu_check.py, the script for the day a GPU is lent, on the CPU at toy size:
    its figures come out (so it cannot rot between GPU sessions)."""
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--toy",
         "--out", str(tmp_path / "check")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    report = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    assert report["phase1"]["images_per_s"][0] > 0 and report["phase1"]["peak_memory_mb"] > 0
    assert report["phase2_step_over_phase1"] > 0 and report["amp"] is False  # CPU: no AMP
    assert "train images/s" in out.stdout and "phase2 step / phase1 step" in out.stdout


def test_the_study_profile_runs_its_nested_design_shrunk(tmp_path: Path) -> None:
    """configs/study.yaml (several Phase 1 seeds, Phase 2 seeds on each), at micro size and
    shrunk to 2 Phase 1 seeds x 2 Phase 2 seeds: each Phase 2 seed fine-tunes, and is
    compared with, its own Phase 1 run, and the post-mortem's intervals resample all three
    levels (the estimator itself: test_bootstrap's known-variance test)."""
    import subprocess

    (tmp_path / "work").mkdir()
    work = copy_workflow(tmp_path / "work")
    study = yaml.safe_load((work / "configs" / "study.yaml").read_text())["pipeline"]
    assert len(study["phase1_seeds"]) >= 3 and len(study["seeds"]) >= 3 * len(
        study["phase1_seeds"]
    )  # the shipped design: at least 3 x 3
    overlay = {"pipeline": {"phase1_seeds": [0, 1], "seeds": [0, 1, 2, 3], "bootstrap": 20,
                            "presets": ["deimv2-dinov3-tiny"],
                            "variants": ["zero_start", "frozen0"]}}  # fmt: skip
    (work / "configs" / "shrunk.yaml").write_text(yaml.safe_dump(overlay))
    out = subprocess.run(
        ["snakemake", "--cores", "2", "--configfile", "configs/study.yaml", "configs/micro.yaml",
         "configs/shrunk.yaml"],
        cwd=work, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    main = "deimv2-dinov3-tiny"
    assert (work / "runs" / "phase1" / f"{main}_seed1" / "best.pt").is_file()
    for seed, run in ((0, main), (1, main), (2, f"{main}_seed1"), (3, f"{main}_seed1")):
        cmp = json.loads((work / "results" / "compare" / f"zero_start_seed{seed}.json").read_text())
        assert cmp["a"] == f"results/phase1/{run}/test_metrics.json", seed
    pm = json.loads((work / "results" / "postmortem.json").read_text())
    assert pm["phase1_runs"] == [main, f"{main}_seed1"] and pm["phase1_of"] == [0, 0, 1, 1]
    drift = pm["phase2"]["zero_start"]["drift"]["epoch1"]["val"]["map"]
    assert drift["levels"] == "phase1_seeds+phase2_seeds+images"
    assert pm["phase1"]["test"]["map"]["levels"] == "phase1_seeds+images"
    assert "semillas de la Fase 1" in (work / "results" / "tables" / "settings.md").read_text()
