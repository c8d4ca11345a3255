"""The typed run configuration, read from `params.yaml` and profile overlays.

`params.yaml` at the repository root is the single source of hyperparameters: Snakemake
reads it (``configfile``), DVC tracks it (``params``), and every CLI command that trains
or evaluates takes it with ``--config``. Profiles (``configs/micro.yaml`` ...) are overlays
merged on top, and ``--set key=value`` overrides one value. Unknown keys are errors, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from defectfusion.errors import UserError


@dataclass
class AugmentSection:
    hflip: float = 0.5
    vflip: float = 0.5
    scale_jitter: tuple[float, float] = (0.75, 1.25)
    photometric: float = 0.5


@dataclass
class DataSection:
    dir: str = "data/synth"  # a prepared dataset in the layout of data/coco.py
    image_size: int = 192  # network input side; a multiple of 32 (DEIMv2's strides)
    critical_classes: list[int] = field(default_factory=lambda: [2, 3, 5])
    augment: AugmentSection = field(default_factory=AugmentSection)
    num_workers: int = 0


@dataclass
class ModelSection:
    preset: str = "deimv2-dinov3-tiny"
    # scratch: random init (asked for by name); backbone: pretrained backbone weights;
    # detector: a whole pretrained detector. `weights` is a hub id or a local path.
    init: str = "scratch"
    weights: str | None = None


@dataclass
class TrainSection:
    epochs: int = 12
    batch_size: int = 8
    lr: float = 1e-3
    backbone_lr_mult: float = 0.1  # backbone lr = lr * this
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    flat_fraction: float = 0.5  # flat-cosine: constant lr for this fraction, then cosine
    min_lr_fraction: float = 0.05
    clip_grad: float = 0.1
    ema_decay: float = 0.0  # 0 disables EMA (short CPU runs: EMA 0.999 lags the raw weights)
    patience: int = 0  # early stopping on the selection metric; 0 disables
    select_metric: str = "map"  # which val metric picks the best checkpoint
    amp: bool = True  # bfloat16 autocast on CUDA only
    eval_every: int = 1  # epochs


@dataclass
class EvalSection:
    batch_size: int = 16
    composite_weights: dict[str, float] = field(
        default_factory=lambda: {"map": 0.7, "critical_recall": 0.3}
    )
    iou_match: float = 0.5  # confusion matrix matching
    score_threshold: float = 0.3  # confusion matrix and qualitative figures


@dataclass
class TextSection:
    encoder: str = "minilm"  # clip-vit-b-32 | siglip-* | minilm | random | a local path
    weights: str | None = None
    prompts: str = "prompts/synth.yaml"


@dataclass
class FusionSection:
    init: str = "zero_start"  # zero_start | naive
    alpha: str = "learned"  # learned | frozen0 (text branch off: the control)
    loss: str = "focal"  # focal | deimv2
    bn: str = "eval"  # eval | train (frozen modules' BatchNorm statistics)
    tau_init: float = 0.07
    fuse_encoder_head: bool = True
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class Config:
    seed: int = 0
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    phase1: TrainSection = field(default_factory=TrainSection)
    phase2: TrainSection = field(
        default_factory=lambda: TrainSection(
            epochs=100, lr=5e-5, patience=20, select_metric="composite", warmup_steps=0
        )
    )
    eval: EvalSection = field(default_factory=EvalSection)
    text: TextSection = field(default_factory=TextSection)
    fusion: FusionSection = field(default_factory=FusionSection)
    # Anything the pipeline (Snakefile) needs that the CLI does not: kept, not checked here.
    pipeline: dict[str, Any] = field(default_factory=dict)
    # Per-figure matplotlib rcParams over the report's style: {figure name: {rc key: value}}.
    figure_style: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from a dict, recursing into sections, rejecting unknown keys."""
    if not isinstance(values, dict):
        raise UserError(
            f"config{' ' + where if where else ''}: expected a mapping, got {type(values).__name__}"
        )
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(
            f"config{' ' + where if where else ''}: unknown key(s) {unknown}; known: {sorted(names)}"
        )
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = get_origin(hint)
    if value is None:
        if type(None) in get_args(hint):
            return None
        raise UserError(f"config {key}: must not be null")
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise UserError(f"config {key}: expected {hint.__name__}, got {value!r}")
        return value
    if origin is tuple:
        return tuple(_coerce(v, t, key) for v, t in zip(value, get_args(hint), strict=True))
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config {key}: expected a list, got {value!r}")
        (item,) = get_args(hint)
        return [_coerce(v, item, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config {key}: expected a mapping, got {value!r}")
        return dict(value)
    args = [a for a in get_args(hint) if a is not type(None)]
    if args:  # Optional[X]
        return _coerce(value, args[0], key)
    return value


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: malformed YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data


def apply_override(values: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one ``a.b.c=value`` (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
    node: dict[str, Any] = {}
    overlay = node
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    return deep_merge(values, overlay)


def select(
    values: dict[str, Any], preset: str | None = None, variant: str | None = None
) -> list[str]:
    """The overrides that pick one pipeline run: a Phase 1 preset or a Phase 2 variant.

    ``pipeline.preset_overrides[preset]`` and ``pipeline.variants[variant]`` (plus
    ``pipeline.variant_overrides[variant]``) are dicts of dotted keys, so Snakemake and DVC
    name a run by its name and the settings stay in params.yaml.
    """
    pipe = values.get("pipeline", {}) or {}
    out: list[str] = []
    if preset is not None:
        out.append(f"model.preset={preset}")
        out += [
            f"{k}={json.dumps(v)}"
            for k, v in (pipe.get("preset_overrides") or {}).get(preset, {}).items()
        ]
    if variant is not None:
        variants = pipe.get("variants") or {}
        if variant not in variants:
            raise UserError(
                f"unknown Phase 2 variant {variant!r}; pipeline.variants has {sorted(variants)}"
            )
        extra = (pipe.get("variant_overrides") or {}).get(variant, {})
        out += [f"{k}={json.dumps(v)}" for k, v in {**variants[variant], **extra}.items()]
    return out


def load_config(
    paths: list[str | Path] | None = None,
    overrides: list[str] | None = None,
    preset: str | None = None,
    variant: str | None = None,
) -> Config:
    """Merge YAML files in order, select a preset/variant, apply ``--set``, and check."""
    values: dict[str, Any] = {}
    for p in paths or []:
        values = deep_merge(values, read_yaml(p))
    for o in [*select(values, preset, variant), *(overrides or [])]:
        values = apply_override(values, o)
    where = "+".join(str(p) for p in paths or []) or "<defaults>"
    try:
        cfg = _build(Config, values, "")
    except UserError as e:  # name the file(s) the bad value came from
        raise UserError(f"{where}: {e}") from None
    validate(cfg, where)
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config saved in a checkpoint or results file."""
    return _build(Config, values, "")


def validate(cfg: Config, where: str) -> None:
    if cfg.data.image_size <= 0 or cfg.data.image_size % 32:
        raise UserError(
            f"{where}: data.image_size={cfg.data.image_size} must be a positive multiple of 32 "
            "(DEIMv2's feature strides); use e.g. 192, 224, 256 or 320"
        )
    choices = {
        "model.init": (cfg.model.init, ("scratch", "backbone", "detector")),
        "fusion.init": (cfg.fusion.init, ("zero_start", "naive")),
        "fusion.alpha": (cfg.fusion.alpha, ("learned", "frozen0")),
        "fusion.loss": (cfg.fusion.loss, ("focal", "deimv2")),
        "fusion.bn": (cfg.fusion.bn, ("eval", "train")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"{where}: {key}={value!r} must be one of {list(allowed)}")
    if cfg.model.init != "scratch" and not cfg.model.weights:
        raise UserError(
            f"{where}: model.init={cfg.model.init!r} needs model.weights (a hub id or a local path)"
        )
    for section in ("phase1", "phase2"):
        t: TrainSection = getattr(cfg, section)
        if t.select_metric not in ("map", "composite", "critical_recall"):
            raise UserError(
                f"{where}: {section}.select_metric must be map, composite or critical_recall"
            )
