"""The typed run configuration, read from `params.yaml` and profile overlays.

`params.yaml` at the repository root is the single source of hyperparameters: Snakemake
reads it (``configfile``), DVC tracks it (``params``), every CLI command that trains or
evaluates takes it with ``--config``, and the dataclasses below take their defaults from it
(`defaults_from`): they declare each setting's name, type and meaning, never its value.
Profiles (``configs/micro.yaml`` ...) are overlays merged on top, and ``--set key=value``
overrides one value. Unknown keys are errors, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from defectfusion.core.errors import UserError, is_number
from defectfusion.core.fsutil import os_error_message

# The defaults: params.yaml, the one file that holds them. The sections below declare the
# settings (name, type, what it means) and no values: `defaults_from` gives each field
# params.yaml's value, read when a section is made without it. The package's params.yaml is
# a link to the checkout's (a wheel carries a copy), so editing params.yaml changes the
# defaults too; a profile is an overlay on it either way.
DEFAULTS_FILE = Path(__file__).with_name("params.yaml")


@functools.cache
def _defaults() -> dict[str, Any]:
    return read_yaml(DEFAULTS_FILE)


def defaults_from(section: str) -> Callable[[type], type]:
    """A class decorator (under ``@dataclass``): every field of the class, inherited ones
    included, defaults to params.yaml's value at ``section.field`` (a nested section: its own
    class's defaults). Read lazily, so a broken params.yaml is one UserError when a default is
    needed, not an import-time traceback."""

    def wrap(cls: type) -> type:
        own = cls.__dict__.get("__annotations__", {})
        for base in reversed(cls.__mro__[1:-1]):  # redeclare inherited fields: new defaults
            for name, hint in base.__dict__.get("__annotations__", {}).items():
                own.setdefault(name, hint)
        for name in own:
            default = functools.partial(_default, cls, section, name)
            setattr(cls, name, field(default_factory=default))
        return cls

    return wrap


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _default(cls: type, section: str, name: str) -> Any:
    hint = _hints(cls)[name]
    if dataclasses.is_dataclass(hint):
        return hint()
    key = f"{section}.{name}" if section else name
    node: Any = _defaults()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UserError(
                f"{DEFAULTS_FILE}: {key} is missing; params.yaml holds every setting's default "
                "(restore the line: git checkout params.yaml)"
            )
        node = node[part]
    return _coerce(copy.deepcopy(node), hint, f"{DEFAULTS_FILE.name} {key}")


@dataclass
@defaults_from("data.augment")
class AugmentSection:
    hflip: float
    vflip: float
    scale_jitter: tuple[float, float]
    photometric: float


# DINOv3 (like most ImageNet-pretrained backbones) was trained on these statistics.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# OpenAI CLIP's constants (open_clip.constants.OPENAI_DATASET_MEAN/STD): what a script that
# borrowed a vision-language model's preprocessing would feed the detector.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
# SigLIP's constants (open_clip.constants.INCEPTION_MEAN/STD, which open_clip's SigLIP models
# use): pixels mapped to [-1, 1]. Written out, not imported: open_clip's package import costs
# about 1.5 s in every process that reads images; tests/test_loader.py holds both sets of
# vision-language constants equal to open_clip's.
SIGLIP_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
SIGLIP_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
# No normalisation: the [0, 1] pixels as they are (the dose-response's far end).
NONE_MEAN: tuple[float, float, float] = (0.0, 0.0, 0.0)
NONE_STD: tuple[float, float, float] = (1.0, 1.0, 1.0)
# ``data.normalize`` names -> (mean, std). The one list of names: the config's choices, the
# checkpoint meta check, evaluation, prediction, export and the report's dose-response read it
# (here, not in data/loader.py: this module imports no torch).
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": (CLIP_MEAN, CLIP_STD),
    "siglip": (SIGLIP_MEAN, SIGLIP_STD),
    "none": (NONE_MEAN, NONE_STD),
}
NORMALIZE_CHOICES: tuple[str, ...] = tuple(NORMALIZATIONS)  # the `data.normalize` names


@dataclass
@defaults_from("data")
class DataSection:
    dir: str  # a prepared dataset in the layout of data/coco.py
    image_size: int  # network input side; a multiple of 32 (DEIMv2's strides)
    critical_classes: list[int]
    augment: AugmentSection
    num_workers: int
    # Input normalisation (NORMALIZE_CHOICES): imagenet (the backbone's, Phase 1) | clip |
    # siglip (vision-language models' constants) | none (raw [0, 1] pixels): the post-mortem's
    # preprocessing-mismatch controls for Phase 2, from the smallest change to the largest.
    normalize: str


@dataclass
@defaults_from("model")
class ModelSection:
    preset: str
    # scratch: random init (asked for by name); backbone: pretrained backbone weights;
    # detector: a whole pretrained detector. `weights` is a hub id or a local path.
    init: str
    weights: str | None


WARMUP_SHAPES = ("linear", "quadratic")  # train.schedule.lr_lambda


@dataclass
@defaults_from("phase1")
class TrainSection:
    epochs: int
    batch_size: int
    lr: float
    backbone_lr_mult: float  # backbone lr = lr * this (0.1 for a pretrained backbone)
    weight_decay: float
    warmup_steps: int
    warmup_shape: str  # linear | quadratic (DEIMv2's FlatCosineLRScheduler)
    flat_fraction: float  # flat-cosine: constant lr for this fraction, then cosine
    min_lr_fraction: float
    # The last fraction of the steps at the minimum lr (DEIMv2's final epochs; the CPU default
    # has none: `max_epochs` holds the minimum past the schedule instead).
    final_fraction: float
    clip_grad: float
    ema_decay: float  # 0 disables EMA
    ema_warmup_steps: int  # DEIMv2's ramp: decay_t = ema_decay * (1 - exp(-t / this))
    mal_gamma: float  # MAL's gamma in DEIMv2's configs (transformers' default is 2.0)
    # Plateau: the val mAP gain over the last `plateau_fraction` of the epochs is below
    # `plateau_min_gain` (reported for Phase 1; 0 disables the check).
    plateau_fraction: float
    plateau_min_gain: float
    # Beyond `epochs`, hold the minimum lr up to this many epochs until the plateau is met
    # (then stop); 0 (or <= epochs): the schedule's `epochs` only.
    max_epochs: int
    patience: int  # early stopping on the selection metric; 0 disables
    select_metric: str  # which val metric picks the best checkpoint
    amp: bool  # bfloat16 autocast on CUDA only
    eval_every: int  # epochs


@dataclass
@defaults_from("phase2")
class Phase2Section(TrainSection):
    # Every field takes params.yaml's phase2 value, the inherited ones too: a phase2 section
    # given in part gets Phase 2's defaults, not Phase 1's.
    # Phase 2 trains on a frozen backbone + encoder: their output is cached per image and
    # view (defectfusion.model.cache) and reused by every run from the same Phase 1 checkpoint.
    cache: bool  # off, or fusion.bn=train (the frozen part then changes): run it live
    # Training views: N >= 1 a fixed pool of N augmented views per image, drawn once from
    # view_seed (not the run's seed, so seeds and variants share it); 0 no augmentation;
    # -1 fresh augmentations every epoch (cannot be cached).
    cache_views: int
    view_seed: int
    cache_dtype: str  # float32 | float16 | bfloat16: features on disk
    cache_dir: str  # relative to the working directory


@dataclass
@defaults_from("eval")
class EvalSection:
    batch_size: int
    composite_weights: dict[str, float]
    iou_match: float  # confusion matrix matching
    score_threshold: float  # confusion matrix and qualitative figures


@dataclass
@defaults_from("postmortem")
class PostmortemSection:
    """The post-mortem's decision rule, declared before the run (defectfusion.analysis.postmortem.judge;
    the book quotes it). A hypothesis "reproduces the thesis's drop" only when its epoch-1
    val drift's interval, adjusted for the number of hypotheses, excludes 0; the test split
    agrees (same sign, its own adjusted interval excluding 0); and its drop relative to Phase 1
    reaches `min_fraction` of the thesis's relative drop. "No change" only by equivalence."""

    level: float  # family-wise confidence of the rule's intervals, percent
    adjust: str  # bonferroni (each interval at 1 - (1 - level) / H) | none
    test_agrees: bool  # the test split must confirm the val split's direction
    min_fraction: float  # of the thesis's relative drop (-0.114 / 0.785 = -14.5 %)
    equivalence_margin: float  # mAP: "no change" when the interval lies inside +-margin


@dataclass
@defaults_from("text")
class TextSection:
    encoder: str  # clip-vit-b-32 | siglip-* | minilm | random | a local path
    weights: str | None
    prompts: str


@dataclass
@defaults_from("fusion")
class FusionSection:
    init: str  # zero_start | naive
    alpha: str  # learned | frozen0 (text branch off: the control)
    loss: str  # focal | mal (Phase 1's loss, DEIMv2's matching-aware loss)
    bn: str  # eval | train (frozen modules' BatchNorm statistics)
    start: str  # ema | raw: which Phase 1 weights Phase 2 starts from
    tau_init: float
    fuse_encoder_head: bool
    focal_alpha: float
    focal_gamma: float


@dataclass
@defaults_from("pipeline.dataset")
class DatasetSection:
    """How the pipeline's data step makes data.dir (`defectfusion data prepare`)."""

    kind: str  # synth | neu | coco
    seed: int
    n_train: int  # synth only: images per split
    n_val: int
    n_test: int
    src: str | None  # neu: the NEU-DET folder; coco: the images folder
    annotations: str | None  # coco: the annotations JSON


@dataclass
@defaults_from("pipeline")
class PipelineSection:
    """What the Snakefile runs: the dataset, the presets, the Phase 2 variants and seeds."""

    profile: str  # named in the summary and the book
    dataset: DatasetSection
    presets: list[str]
    # preset -> {dotted key: value}, variant -> {dotted key: value}: checked key by key
    preset_overrides: dict[str, Any]
    variants: list[str]
    variant_switches: dict[str, Any]
    variant_overrides: dict[str, Any]
    seeds: list[int]
    # The study design (configs/study.yaml): Phase 1 trained once per seed listed (the main
    # preset), `seeds` split into as many equal consecutive blocks, block k fine-tuned from
    # Phase 1 seed k; the intervals then resample Phase 1 seeds, Phase 2 seeds and images.
    # Empty: one Phase 1 run (the config's `seed`), and every interval is conditional on it.
    phase1_seeds: list[int]
    bootstrap: int
    # the post-mortem checks its interval's coverage at this run's design on simulated data
    # (defectfusion.analysis.coverage): trials per seed spread; 0: not checked
    coverage_trials: int
    requires_gpu: bool
    gpus: int


@dataclass
@defaults_from("")
class Config:
    seed: int
    data: DataSection
    model: ModelSection
    phase1: TrainSection
    phase2: Phase2Section
    eval: EvalSection
    text: TextSection
    fusion: FusionSection
    postmortem: PostmortemSection
    pipeline: PipelineSection
    # Per-figure matplotlib rcParams over the report's style: {figure name: {rc key: value}}.
    figure_style: dict[str, Any]

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
    if hint is float:
        if isinstance(value, str):  # Snakemake's --config passes 0.000123 as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise UserError(f"config {key}: expected a number, got {value!r}")
        return float(value)
    if hint is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"  # --config 'pipeline={"requires_gpu": true}' gives 'true'
    if hint is int and isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        value = int(value)  # and a number inside such a mapping may come as text too
    if hint in (int, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise UserError(f"config {key}: expected {hint.__name__}, got {value!r}")
        return value
    if origin is tuple:
        items = get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise UserError(f"config {key}: expected a list of {len(items)} values, got {value!r}")
        return tuple(_coerce(v, t, key) for v, t in zip(value, items, strict=True))
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


def weights_ok(weights: Any) -> bool:
    """Composite weights as a file may hold them: metric names to non-negative finite
    numbers (a checkpoint's meta, a metrics file: both untrusted)."""
    return isinstance(weights, dict) and all(
        isinstance(k, str) and is_number(v) and v >= 0 for k, v in weights.items()
    )


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
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(os_error_message(e, path)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:  # YAML has no NUL; a binary file would give a confusing parse error
        raise UserError(f"{path}: not a text file (binary, or not UTF-8); pass a YAML config")
    data = safe_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data


# A YAML alias reuses a node; nested aliases multiply ("billion laughs"), and the expansion
# happens later (to_dict, json.dumps) with no bound. Aliases are fine up to this many nodes.
MAX_YAML_NODES = 100_000


def safe_yaml(text: str, where: str | Path) -> Any:
    """`yaml.safe_load` that refuses alias bombs (node count after expansion capped)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_nodes(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise UserError(
                f"{where}: YAML aliases expand to more than {MAX_YAML_NODES:,} values (an alias "
                "bomb?); write the values out instead of nesting aliases"
            )
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{where}: malformed YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise UserError(f"{where}: YAML nested too deeply") from None


def _expanded_nodes(root: yaml.Node, limit: int) -> int:
    """Nodes `root` stands for once every alias is expanded (memoised: aliases share nodes)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.SequenceNode):
            kids = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        else:
            sizes[id(node)] = 1
            continue
        if children_done:
            sizes[id(node)] = min(limit + 1, 1 + sum(sizes.get(id(k), 0) for k in kids))
        else:
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in sizes)
    return sizes[id(root)]


def apply_override(values: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one ``a.b.c=value`` (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE")
    key, raw = assignment.split("=", 1)
    value = safe_yaml(raw, f"--set {assignment!r}") if raw else None
    if not key.strip() or any(not p for p in key.strip().split(".")):
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE with a dotted KEY")
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

    ``pipeline.preset_overrides[preset]`` and ``pipeline.variant_switches[variant]`` (plus
    ``pipeline.variant_overrides[variant]``) are dicts of dotted keys, so Snakemake and DVC
    name a run by its name and the settings stay in params.yaml. Any variant with switches
    can be trained by name; ``pipeline.variants`` lists the ones the pipeline runs.
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
        out += [f"{k}={json.dumps(v)}" for k, v in variant_settings(pipe, variant).items()]
    return out


def variant_settings(pipeline: dict[str, Any], variant: str) -> dict[str, Any]:
    """A Phase 2 variant's dotted-key settings: its switches, then its schedule overrides
    (``pipeline.variant_overrides``). The Snakefile records the same dict as the job's params."""
    switches = pipeline.get("variant_switches") or {}
    if variant not in switches:
        raise UserError(
            f"unknown Phase 2 variant {variant!r}; pipeline.variant_switches has {sorted(switches)}"
        )
    extra = (pipeline.get("variant_overrides") or {}).get(variant, {})
    return {**switches[variant], **extra}


def check_override_key(assignment: str) -> None:
    """Refuse ``--set`` of a key the config does not have, naming the keys it has there."""
    if "=" not in assignment:
        return  # apply_override says what is wrong
    key = assignment.split("=", 1)[0].strip()
    cls: Any = Config
    path: list[str] = []
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return  # a free-form mapping (figure_style, a variant's switches): any key goes
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            where = ".".join(path) or "the config"
            raise UserError(
                f"--set {assignment!r}: unknown key {key!r}; {where} has {sorted(fields)}"
            )
        path.append(part)
        cls = get_type_hints(cls)[part]


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
    for o in overrides or []:
        check_override_key(o)  # a typo in --set is the command line's, not the files'
    for o in [*select(values, preset, variant), *(overrides or [])]:
        values = apply_override(values, o)
    return checked_config(values, "+".join(str(p) for p in paths or []) or "<defaults>")


def with_typed_text(raw: Any, typed: Any) -> Any:
    """`raw` with each text value that the typed config reads as something else (a bool, a
    number: Snakemake's `--config` gives 'false' and '3' inside a mapping) replaced by its
    typed value. Nothing else changes, so a config written as params.yaml writes it keeps its
    exact form (Snakemake compares a job's params by their text)."""
    if isinstance(raw, dict) and isinstance(typed, dict):
        return {k: with_typed_text(v, typed[k]) if k in typed else v for k, v in raw.items()}
    if isinstance(raw, list) and isinstance(typed, list | tuple) and len(raw) == len(typed):
        return [with_typed_text(r, t) for r, t in zip(raw, typed, strict=True)]
    if isinstance(raw, str) and not isinstance(typed, str) and typed is not None:
        return typed
    return raw


def checked_config(values: dict[str, Any], where: str) -> Config:
    """The typed, validated Config of merged `values`; a bad key or value is one UserError
    naming `where` (the files, or the Snakefile's resolved config) and the key."""
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
        "fusion.loss": (cfg.fusion.loss, ("focal", "mal")),
        "fusion.bn": (cfg.fusion.bn, ("eval", "train")),
        "fusion.start": (cfg.fusion.start, ("ema", "raw")),
        "data.normalize": (cfg.data.normalize, NORMALIZE_CHOICES),
        "postmortem.adjust": (cfg.postmortem.adjust, ("bonferroni", "none")),
        "phase2.cache_dtype": (cfg.phase2.cache_dtype, ("float32", "float16", "bfloat16")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"{where}: {key}={value!r} must be one of {list(allowed)}")
    if cfg.model.init != "scratch" and not cfg.model.weights:
        raise UserError(
            f"{where}: model.init={cfg.model.init!r} needs model.weights (a hub id or a local path)"
        )
    if cfg.phase2.cache_views < -1:
        raise UserError(
            f"{where}: phase2.cache_views={cfg.phase2.cache_views} must be >= 1 (a pool of "
            "views), 0 (no augmentation) or -1 (fresh augmentations every epoch)"
        )
    for section in ("phase1", "phase2"):
        t: TrainSection = getattr(cfg, section)
        if t.select_metric not in ("map", "composite", "critical_recall"):
            raise UserError(
                f"{where}: {section}.select_metric must be map, composite or critical_recall"
            )
    check_ranges(cfg, where)
    check_pipeline(cfg.pipeline, where)
    check_phase1_seeds(cfg, where)


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")


def safe_name(name: object) -> bool:
    """Whether `name` can be one path segment: no separator, no '..', no leading dot or dash,
    at most 100 characters."""
    return isinstance(name, str) and len(name) <= 100 and bool(_SAFE_NAME.fullmatch(name))


# The dataset kinds, one registry: each kind and the pipeline.dataset keys it needs besides
# (a path that must exist). Config validation, data.prepare and the pipeline's preflight ask
# it; data.importers.MAKERS maps each kind to its maker (a test holds the two keys equal).
DATASET_KINDS: dict[str, tuple[str, ...]] = {
    "synth": (),  # generated: data/synth.py
    "neu": ("src",),  # a NEU-DET folder
    "coco": ("src", "annotations"),  # an images folder and one COCO JSON
}


def check_pipeline(pipe: PipelineSection, where: str) -> None:
    """The pipeline section: names that exist, overrides whose keys are the config's."""
    if pipe.dataset.kind not in DATASET_KINDS:
        raise UserError(
            f"{where}: pipeline.dataset.kind={pipe.dataset.kind!r} must be one of "
            f"{list(DATASET_KINDS)}"
        )
    for name in ("presets", "variants", "seeds"):
        values = getattr(pipe, name)
        if not values or len(set(values)) != len(values):
            raise _range_error(where, f"pipeline.{name}", values, "a non-empty list, no repeats")
    # Preset and variant names become folder names (runs/phase1/PRESET, runs/phase2/VARIANT):
    # one rule, checked here where the config is typed, keeps them inside their folders.
    for table, names in (
        ("presets", pipe.presets),
        ("variants", pipe.variants),
        ("variant_switches", list(pipe.variant_switches)),
        ("preset_overrides", list(pipe.preset_overrides)),
        ("variant_overrides", list(pipe.variant_overrides)),
    ):
        for n in names:
            if not safe_name(n):
                raise UserError(
                    f"{where}: pipeline.{table} has {n!r}, not a safe name (it becomes a folder "
                    "name): use letters, digits, '_', '-' and single dots, starting with a "
                    "letter or digit"
                )
    if "zero_start" not in pipe.variants:  # report.ADOPTED_VARIANT (config imports no report)
        raise UserError(
            f"{where}: pipeline.variants {pipe.variants} must include zero_start, the adopted "
            "recipe every other variant is compared with"
        )
    unknown = [v for v in pipe.variants if v not in pipe.variant_switches]
    if unknown:
        raise UserError(
            f"{where}: pipeline.variants has {unknown}, not in pipeline.variant_switches "
            f"({sorted(pipe.variant_switches)}); add their switches or drop them"
        )
    for table in ("preset_overrides", "variant_switches", "variant_overrides"):
        for name, overrides in getattr(pipe, table).items():
            if not isinstance(overrides, dict):
                raise UserError(
                    f"{where}: pipeline.{table}.{name} must be a mapping of dotted keys to "
                    f"values, got {overrides!r}"
                )
            for key in overrides:
                try:
                    check_override_key(f"{key}=")
                except UserError as e:
                    raise UserError(f"{where}: pipeline.{table}.{name}: {e}") from None
    for key, lo in (("bootstrap", 1), ("gpus", 1), ("coverage_trials", 0)):
        if getattr(pipe, key) < lo:
            raise _range_error(where, f"pipeline.{key}", getattr(pipe, key), f"an integer >= {lo}")
    if any(s < 0 for s in pipe.seeds):
        raise _range_error(where, "pipeline.seeds", pipe.seeds, "integers >= 0")
    for p in pipe.presets:
        if PHASE1_SEED_RUN.fullmatch(p):  # runs/phase1/PRESET_seedK is a Phase 1 seed's run
            raise UserError(
                f"{where}: pipeline.presets has {p!r}: a name ending in _seedN is reserved for "
                "the study's Phase 1 seeds (pipeline.phase1_seeds); rename the preset"
            )


def phase1_seeds_problem(values: dict[str, Any]) -> str | None:
    """The workflow's config (not a job's): the study's Phase 1 seeds include `seed`, whose
    run (runs/phase1/PRESET) is the main model every figure and table shows."""
    p1 = (values.get("pipeline") or {}).get("phase1_seeds") or []
    seed = values.get("seed", 0)
    if p1 and seed not in p1:
        return (
            f"pipeline.phase1_seeds {p1} must include the config's seed ({seed}): its Phase 1 "
            "run is the main model the figures and tables show; add it or change seed"
        )
    return None


# A Phase 1 run of the main preset at another seed than the config's: runs/phase1/PRESET_seedK.
PHASE1_SEED_RUN = re.compile(r"(.+)_seed(\d+)")


def check_phase1_seeds(cfg: Config, where: str) -> None:
    """The study design: distinct seeds, and the same number of Phase 2 seeds on each. (That
    the config's seed is among them is the workflow's check, `phase1_seeds_problem`: a
    Phase 2 job's own config carries its Phase 2 seed.)"""
    p1, seeds = cfg.pipeline.phase1_seeds, cfg.pipeline.seeds
    if not p1:
        return
    if len(set(p1)) != len(p1) or any(s < 0 for s in p1):
        raise _range_error(where, "pipeline.phase1_seeds", p1, "distinct integers >= 0")
    if len(seeds) % len(p1):
        raise UserError(
            f"{where}: pipeline.seeds has {len(seeds)} seeds, not a multiple of the "
            f"{len(p1)} pipeline.phase1_seeds: each Phase 1 seed needs the same number of "
            "Phase 2 seeds (consecutive blocks: the first block fine-tunes Phase 1 seed "
            f"{p1[0]})"
        )



# ---- value ranges: checked before any work, so a bad value is one line, not a crash later ----


def _range_error(where: str, key: str, value: Any, want: str) -> UserError:
    return UserError(f"{where}: {key}={value!r} must be {want}")


def check_ranges(cfg: Config, where: str) -> None:
    """Numbers a run cannot use: non-finite, zero or negative sizes, probabilities off [0, 1]."""

    def at_least(key: str, value: Any, lo: float) -> None:
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= lo):
            kind = "an integer" if isinstance(value, int) else "a finite number"
            raise _range_error(where, key, value, f"{kind} >= {lo:g}")

    def positive(key: str, value: Any) -> None:
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise _range_error(where, key, value, "a finite number > 0")

    def fraction(key: str, value: Any) -> None:
        if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):  # NaN fails too
            raise _range_error(where, key, value, "in [0, 1]")

    at_least("seed", cfg.seed, 0)
    at_least("data.num_workers", cfg.data.num_workers, 0)
    aug = cfg.data.augment
    for name in ("hflip", "vflip", "photometric"):
        fraction(f"data.augment.{name}", getattr(aug, name))
    lo_hi = aug.scale_jitter
    if not (
        len(lo_hi) == 2 and all(math.isfinite(v) for v in lo_hi) and 0.0 < lo_hi[0] <= lo_hi[1]
    ):
        raise _range_error(
            where, "data.augment.scale_jitter", list(lo_hi), "[low, high] with 0 < low <= high"
        )
    crit = cfg.data.critical_classes
    if not crit or any(c < 0 for c in crit) or len(set(crit)) != len(crit):
        raise _range_error(
            where,
            "data.critical_classes",
            crit,
            "a non-empty list of distinct class indices >= 0 (the defects whose recall counts)",
        )
    for section in ("phase1", "phase2"):
        t: TrainSection = getattr(cfg, section)
        positive(f"{section}.lr", t.lr)
        for key in ("epochs", "batch_size", "eval_every"):
            at_least(f"{section}.{key}", getattr(t, key), 1)
        for key in ("warmup_steps", "patience", "weight_decay", "backbone_lr_mult", "clip_grad"):
            at_least(f"{section}.{key}", getattr(t, key), 0)
        for key in ("flat_fraction", "min_lr_fraction", "final_fraction"):
            fraction(f"{section}.{key}", getattr(t, key))
        if t.flat_fraction + t.final_fraction > 1.0:
            raise _range_error(
                where,
                f"{section}.final_fraction",
                t.final_fraction,
                f"at most 1 - flat_fraction ({1.0 - t.flat_fraction:g}): the flat and final "
                "stretches cannot overlap",
            )
        at_least(f"{section}.max_epochs", t.max_epochs, 0)
        if section == "phase2" and t.max_epochs:
            raise _range_error(
                where, "phase2.max_epochs", t.max_epochs, "0: only Phase 1 extends to its plateau"
            )
        if t.warmup_shape not in WARMUP_SHAPES:
            raise _range_error(
                where, f"{section}.warmup_shape", t.warmup_shape, f"one of {WARMUP_SHAPES}"
            )
        if not 0.0 <= t.ema_decay < 1.0:
            raise _range_error(where, f"{section}.ema_decay", t.ema_decay, "in [0, 1) (0: off)")
    at_least("eval.batch_size", cfg.eval.batch_size, 1)
    fraction("eval.score_threshold", cfg.eval.score_threshold)
    positive("eval.iou_match", cfg.eval.iou_match)
    fraction("eval.iou_match", cfg.eval.iou_match)
    for name, w in cfg.eval.composite_weights.items():
        at_least(f"eval.composite_weights.{name}", w, 0)
    positive("fusion.tau_init", cfg.fusion.tau_init)
    pm = cfg.postmortem
    if not (isinstance(pm.level, int | float) and 50.0 <= pm.level < 100.0):
        raise _range_error(where, "postmortem.level", pm.level, "a percentage in [50, 100)")
    fraction("postmortem.min_fraction", pm.min_fraction)
    fraction("postmortem.equivalence_margin", pm.equivalence_margin)


def check_classes(cfg: Config, class_names: list[str], where: str) -> None:
    """Critical classes must be classes of the dataset the run reads (`class_names`)."""
    k = len(class_names)
    bad = [c for c in cfg.data.critical_classes if not 0 <= c < k]
    if bad:
        raise UserError(
            f"{where}: data.critical_classes {cfg.data.critical_classes} has {bad}, not a class "
            f"of this dataset (0..{k - 1}: {class_names}); set the indices of its defect classes"
        )
