"""One set of defaults: the config dataclasses read theirs from params.yaml, key for key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from defectfusion.config import Config

ROOT = Path(__file__).resolve().parents[1]


def _leaves(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "composite_weights":
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def test_the_dataclass_defaults_are_params_yaml_s() -> None:
    """Every setting the config knows is in params.yaml with the same value, the pipeline's
    too (its variants' switches included); `figure_style` alone is free-form."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    defaults = Config().to_dict()
    params.pop("figure_style"), defaults.pop("figure_style")
    want, have = _leaves(params), _leaves(defaults)
    assert sorted(set(have) - set(want)) == [], "settings params.yaml does not list"
    assert sorted(set(want) - set(have)) == [], "params.yaml settings nothing reads"
    assert {k: v for k, v in have.items() if v != want[k]} == {}, "defaults that disagree"


def test_the_sections_declare_no_value_of_their_own() -> None:
    """No second copy: every field of every section takes its default from params.yaml (a
    literal default in config.py would be a value params.yaml does not control)."""
    import dataclasses

    from defectfusion import config

    sections = [config.Config]
    for cls in sections:
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING, f"{cls.__name__}.{f.name} has a literal default"
            hint = config._hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                sections.append(hint)
    assert len(sections) == 12  # Config and its eleven sections, nested ones included
    assert config.DEFAULTS_FILE.resolve() == (ROOT / "params.yaml").resolve()


def test_a_default_missing_from_params_yaml_is_one_line_naming_it(tmp_path, monkeypatch) -> None:
    """A line deleted from params.yaml: the default it held is a UserError naming the key and
    the fix, raised when the default is needed (not a traceback at import)."""
    from defectfusion import config
    from defectfusion.core.errors import UserError

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    del params["phase1"]["lr"]
    broken = tmp_path / "params.yaml"
    broken.write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.setattr(config, "DEFAULTS_FILE", broken)
    config._defaults.cache_clear()
    try:
        assert config.Phase2Section().lr == 5e-5  # phase2.lr is still there
        with pytest.raises(UserError, match=r"phase1\.lr is missing.*git checkout params.yaml"):
            config.TrainSection()
    finally:
        monkeypatch.undo()
        config._defaults.cache_clear()
    assert config.TrainSection().lr == 1e-3


def test_a_section_given_in_part_keeps_its_own_defaults() -> None:
    """Phase 2's defaults are Phase 2's whether its section is absent or given in part (a
    `--set phase2.lr=...` once fell back to Phase 1's EMA and schedule)."""
    from defectfusion.config import load_config

    whole, part = load_config(), load_config(overrides=["phase2.lr=0.01"])
    assert part.phase2.lr == 0.01
    for key in ("ema_decay", "epochs", "batch_size", "flat_fraction", "select_metric"):
        assert getattr(part.phase2, key) == getattr(whole.phase2, key), key
    assert part.phase2.ema_decay == 0.0 != part.phase1.ema_decay


@pytest.mark.parametrize(
    "overlay, message",
    [
        ({"pipeline": {"variants": ["zero_start", "nope"]}}, "pipeline.variants has ['nope']"),
        ({"pipeline": {"variant_switches": {"x": {"fusion.inti": "naive"}}}}, "fusion.inti"),
        ({"pipeline": {"preset_overrides": {"p": {"phase1.epoch": 2}}}}, "phase1.epoch"),
        ({"pipeline": {"dataset": {"kind": "voc"}}}, "pipeline.dataset.kind='voc'"),
        ({"pipeline": {"dataset": {"n_tset": 3}}}, "unknown key(s) ['n_tset']"),
        ({"pipeline": {"seeds": []}}, "pipeline.seeds"),
        ({"pipeline": {"bootstrap": 0}}, "pipeline.bootstrap"),
        ({"pipeline": {"gpu": 2}}, "unknown key(s) ['gpu']"),
        # names that become folders (issue 27: a preset '../../../victim' deleted a folder
        # three levels above the checkout; a variant wrote its run outside the repository)
        ({"pipeline": {"presets": ["../../../victim"]}}, "not a safe name"),
        ({"pipeline": {"variants": ["../../../escape_v"],
                       "variant_switches": {"../../../escape_v": {}}}}, "not a safe name"),
        ({"pipeline": {"variant_switches": {"a/b": {}}}}, "not a safe name"),
        ({"pipeline": {"variants": ["naive", "frozen0"]}}, "must include zero_start"),
        ({"pipeline": {"preset_overrides": {".hidden": {}}}}, "not a safe name"),
        # the study design (configs/study.yaml): equal blocks, the config's seed among them
        ({"pipeline": {"phase1_seeds": [0, 1], "seeds": [0, 1, 2]}}, "not a multiple"),
        ({"pipeline": {"phase1_seeds": [0, 0]}}, "pipeline.phase1_seeds"),
        ({"pipeline": {"presets": ["deimv2-dinov3-tiny_seed1"]}}, "reserved"),
    ],
)
def test_the_pipeline_section_is_checked_like_the_others(overlay: dict, message: str) -> None:
    """A typo in a variant's switches or a preset's overrides used to reach Snakemake and
    fail inside a job (or not at all); now it stops the config, naming the key."""
    from defectfusion.config import checked_config, deep_merge, read_yaml
    from defectfusion.core.errors import UserError

    values = deep_merge(read_yaml(ROOT / "params.yaml"), overlay)
    with pytest.raises(UserError) as e:
        checked_config(values, "here")
    assert message in str(e.value) and str(e.value).startswith("here: ")


def test_text_from_snakemake_s_config_takes_its_typed_value_and_nothing_else_changes() -> None:
    """`--config 'pipeline={"requires_gpu": false}'` reaches the Snakefile as 'false', which
    Python reads as true: the workflow must read the typed value the jobs read."""
    from defectfusion.config import checked_config, deep_merge, read_yaml, with_typed_text

    raw = deep_merge(
        read_yaml(ROOT / "params.yaml"),
        {"pipeline": {"requires_gpu": "false", "gpus": "2", "seeds": ["0", "1"]}},
    )
    fixed = with_typed_text(raw, checked_config(raw, "here").to_dict())
    assert fixed["pipeline"]["requires_gpu"] is False and fixed["pipeline"]["gpus"] == 2
    assert fixed["pipeline"]["seeds"] == [0, 1]
    # everything else keeps its form (a list stays a list: Snakemake compares params as text)
    assert fixed["data"]["augment"]["scale_jitter"] == [0.75, 1.25]
    assert {k: v for k, v in fixed.items() if k != "pipeline"} == {
        k: v for k, v in raw.items() if k != "pipeline"
    }


# ---- data.normalize and the mechanism profile's variants ----------------------------------

DEFAULT_NINE = [
    "zero_start", "naive", "frozen0", "deimv2_loss", "bn_train", "raw_start", "clip_norm",
    "decoder_only", "thesis_replica",
]  # fmt: skip
MECHANISM = {
    "siglip_norm": {"data.normalize": "siglip"},
    "no_norm": {"data.normalize": "none"},
    "res_256": {"data.image_size": 256},
    "raw_bn": {"fusion.start": "raw", "fusion.bn": "train"},
    "raw_clip": {"fusion.start": "raw", "data.normalize": "clip"},
    "bn_clip": {"fusion.bn": "train", "data.normalize": "clip"},
}


@pytest.mark.parametrize("name", ["imagenet", "clip", "siglip", "none"])
def test_data_normalize_takes_each_name(name: str) -> None:
    from defectfusion.config import load_config

    assert load_config(overrides=[f"data.normalize={name}"]).data.normalize == name


@pytest.mark.parametrize("name", ["inception", "ImageNet", "raw"])
def test_an_unknown_data_normalize_is_one_line_naming_the_choices(name: str) -> None:
    from defectfusion.config import load_config
    from defectfusion.core.errors import UserError

    with pytest.raises(UserError) as e:
        load_config([ROOT / "params.yaml"], overrides=[f"data.normalize={name}"])
    msg = str(e.value)
    assert "\n" not in msg and "data.normalize=" in msg
    assert "['imagenet', 'clip', 'siglip', 'none']" in msg


def test_the_mechanism_variants_are_declared_but_not_run_by_default() -> None:
    """The six mechanism variants are in params.yaml's (and the dataclasses') switches, each
    trainable by name; the default profile still runs the nine, configs/mechanism.yaml all 15."""
    from defectfusion.config import Config, load_config

    for cfg in (Config(), load_config([ROOT / "params.yaml"])):
        assert cfg.pipeline.variants == DEFAULT_NINE
        assert {v: cfg.pipeline.variant_switches[v] for v in MECHANISM} == MECHANISM
    # The factorial: every cell of start x bn x normalize is a declared variant.
    cells = {
        (
            s.get("fusion.start", "ema"),
            s.get("fusion.bn", "eval"),
            s.get("data.normalize", "imagenet"),
        )
        for s in Config().pipeline.variant_switches.values()
        if set(s) <= {"fusion.start", "fusion.bn", "data.normalize"}
        and s.get("data.normalize") in (None, "clip")  # not the dose-response's
    }
    assert len(cells) == 8
    res = load_config([ROOT / "params.yaml"], variant="res_256")
    assert res.data.image_size == 256 and res.fusion == load_config().fusion
    bn_clip = load_config([ROOT / "params.yaml"], variant="bn_clip")
    assert (bn_clip.fusion.bn, bn_clip.data.normalize, bn_clip.fusion.start) == (
        "train",
        "clip",
        "ema",
    )
    mech = load_config([ROOT / "params.yaml", ROOT / "configs/mechanism.yaml"])
    assert mech.pipeline.profile == "mechanism"
    assert mech.pipeline.variants == DEFAULT_NINE + list(MECHANISM)
    # Only the pipeline section differs from the default profile.
    assert {**mech.to_dict(), "pipeline": None} == {**load_config().to_dict(), "pipeline": None}


def test_every_variant_has_a_spanish_name_and_its_own_colour() -> None:
    from defectfusion.config import Config
    from defectfusion.report import MODEL_COLORS, VARIANT_NAMES_ES

    variants = list(Config().pipeline.variant_switches)
    assert [v for v in variants if v not in VARIANT_NAMES_ES] == []
    assert [v for v in variants if v not in MODEL_COLORS] == []
    assert len({VARIANT_NAMES_ES[v] for v in variants}) == len(variants)


def test_the_thesis_profile_gives_each_baseline_its_own_backbone_weights() -> None:
    """The CNN baselines inherited model.init: backbone with the DINOv3 weights and would have
    tried to load them into a ResNet (issue 25): each names its own ImageNet backbone."""
    from defectfusion.config import load_config, read_yaml

    files = [ROOT / "params.yaml", ROOT / "configs/thesis.yaml"]
    thesis = read_yaml(ROOT / "configs/thesis.yaml")
    weights = {
        p: load_config(files, preset=p).model.weights for p in thesis["pipeline"]["presets"]
    }
    assert weights == {
        "deimv2-dinov3-m": "facebook/dinov3-vits16-pretrain-lvd1689m",
        "deimv2-resnet": "microsoft/resnet-18",
        "deimv2-efficientnet": "efficientnet_b0.ra_in1k",
    }


def test_the_study_design_gives_each_phase2_seed_its_phase1_run() -> None:
    """pipeline.phase1_seeds: consecutive blocks of Phase 2 seeds, each on its own Phase 1
    run (runs/phase1/MAIN for the config's seed, MAIN_seedK for the others); the folder name
    gives the preset and seed back. By default one run, MAIN, for every seed."""
    from defectfusion.config import checked_config, deep_merge, read_yaml
    from defectfusion.report import Layout

    params = read_yaml(ROOT / "params.yaml")
    default = Layout.from_config(params)
    assert default.main_runs == (default.main,) and set(default.phase1_of) == {0}
    values = deep_merge(params, read_yaml(ROOT / "configs/study.yaml"))
    checked_config(values, "study")
    study = Layout.from_config(values)
    main = study.main
    assert study.main_runs == (main, f"{main}_seed1", f"{main}_seed2")
    assert study.phase1_of == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    assert [study.phase1_run_of(s) for s in (2, 3, 8)] == [main, f"{main}_seed1", f"{main}_seed2"]
    assert study.run_preset(f"{main}_seed2") == (main, 2)
    assert study.run_preset("deimv2-resnet-tiny") == ("deimv2-resnet-tiny", 0)
    # the post-mortem reads every Phase 1 run's predictions
    assert f"results/phase1/{main}_seed2/test_metrics.predictions.json" in (
        study.postmortem_inputs()
    )
    # the workflow refuses a design without the config's seed (a job's config may lack it)
    from defectfusion.config import phase1_seeds_problem

    assert phase1_seeds_problem(values) is None
    assert "must include the config's seed (5)" in phase1_seeds_problem({**values, "seed": 5})
    checked_config({**values, "seed": 5}, "a Phase 2 job's config")  # no error there
