"""One set of defaults: the config dataclasses' defaults are params.yaml's, key for key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    """Every setting the CLI knows is in params.yaml with the same value (the sections the
    pipeline alone reads, `pipeline` and `figure_style`, are free-form there)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    defaults = Config().to_dict()
    for free in ("pipeline", "figure_style"):
        params.pop(free), defaults.pop(free)
    want, have = _leaves(params), _leaves(defaults)
    assert sorted(set(have) - set(want)) == [], "settings params.yaml does not list"
    assert sorted(set(want) - set(have)) == [], "params.yaml settings nothing reads"
    assert {k: v for k, v in have.items() if v != want[k]} == {}, "defaults that disagree"


def test_a_section_given_in_part_keeps_its_own_defaults() -> None:
    """Phase 2's defaults are Phase 2's whether its section is absent or given in part (a
    `--set phase2.lr=...` once fell back to Phase 1's EMA and schedule)."""
    from defectfusion.config import load_config

    whole, part = load_config(), load_config(overrides=["phase2.lr=0.01"])
    assert part.phase2.lr == 0.01
    for key in ("ema_decay", "epochs", "batch_size", "flat_fraction", "select_metric"):
        assert getattr(part.phase2, key) == getattr(whole.phase2, key), key
    assert part.phase2.ema_decay == 0.0 != part.phase1.ema_decay
