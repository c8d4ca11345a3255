"""The book's Spanish names and every figure's colours, in one file: each class, model,
variant, backbone and text encoder the tables, figures and book show is named here, and each
model is drawn in the same colour everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# ---- names and colours: one place for tables, figures and the book (issue 14) ---------------
# The book is in Spanish: every class, model and variant it shows is named here, and every
# figure draws a model in the same colour (Okabe-Ito, colour-blind safe; a name not listed
# gets a colour from OKABE_ITO by position). The CSV and LaTeX tables keep the English ids.

CLASS_NAMES_ES: dict[str, str] = {
    # the synthetic dataset (the thesis's taxonomy)
    "normal": "Normal",
    "perforation": "Perforación",
    "fracture": "Fractura",
    "scratch": "Arañazo",
    "dent": "Abolladura",
    "contamination": "Contaminación",
    # NEU-DET
    "crazing": "Cuarteado",
    "inclusion": "Inclusión",
    "patches": "Manchas",
    "pitted_surface": "Superficie picada",
    "rolled-in_scale": "Cascarilla laminada",
    "scratches": "Arañazos",
    "background": "Fondo",
}
# The metrics the reported contrasts name (the conclusions' table, the verdict's text).
METRIC_NAMES_ES: dict[str, str] = {
    "map": "mAP",
    "critical_recall": "recall crítico",
    "op_recall_critical": "recall crítico en el punto de operación",
}
VARIANT_NAMES_ES: dict[str, str] = {
    "zero_start": "Arranque en cero",
    "naive": "Inicialización ingenua",
    "frozen0": "α fija en 0",
    "deimv2_loss": "Pérdida de DEIMv2",
    "bn_train": "BN en modo entrenamiento",
    # the post-mortem's further candidate causes (issue 13)
    "raw_start": "Pesos sin EMA",
    "clip_norm": "Normalización de CLIP",
    "decoder_only": "Fusión solo en el decodificador",
    "thesis_replica": "Réplica de la tesis",
    # the mechanism profile's: the preprocessing dose-response and the replica's factorial
    "siglip_norm": "Normalización de SigLIP",
    "no_norm": "Sin normalización",
    "res_256": "Resolución de 256 px",
    "raw_bn": "Pesos sin EMA y BN en entrenamiento",
    "raw_clip": "Pesos sin EMA y normalización de CLIP",
    "bn_clip": "BN en entrenamiento y normalización de CLIP",
}
BACKBONE_NAMES_ES: dict[str, str] = {
    "dinov3": "DINOv3",
    "resnet": "ResNet",
    "efficientnet": "EfficientNet",
}
OKABE_ITO: tuple[str, ...] = (
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442",
)  # fmt: skip
PHASE1_COLOR = "#000000"  # the main Phase 1 model (the one Phase 2 starts from)
MODEL_COLORS: dict[str, str] = {
    # Phase 2 variants
    "zero_start": "#0072B2",
    "naive": "#D55E00",
    "frozen0": "#009E73",
    "deimv2_loss": "#CC79A7",
    "bn_train": "#E69F00",
    # the post-mortem's further variants (Paul Tol's colour-blind-safe set)
    "raw_start": "#332288",
    "clip_norm": "#44AA99",
    "decoder_only": "#999933",
    "thesis_replica": "#882255",
    # the mechanism profile's (the rest of Paul Tol's muted set, and his vibrant magenta)
    "siglip_norm": "#88CCEE",
    "no_norm": "#117733",
    "res_256": "#EE3377",
    "raw_bn": "#CC6677",
    "raw_clip": "#AA4499",
    "bn_clip": "#DDCC77",
    # Phase 1 backbones other than the main one (never a variant's colour)
    "resnet": "#56B4E9",
    "efficientnet": "#8C6D31",
}


def class_name_es(name: str) -> str:
    """The Spanish name of a class id name (unknown names as they are)."""
    return CLASS_NAMES_ES.get(name, name)


def number_es(value: float | None, spec: str = ".2f") -> str:
    """A number as the book prints it (thesis/_ext/thesis_values.py), for the figures' text and
    the summary's sentences: decimal point, a true minus sign (U+2212), never a signed zero,
    a narrow space before %; "n/d" where the run has none (an undefined metric)."""
    if value is None:
        return "n/d"
    text = format(value, spec)
    if float(text.rstrip("%")) == 0:
        text = text.lstrip("+-")
    if text.endswith("%"):
        text = text[:-1] + "\u202f%"
    return text.replace("-", "\u2212")


def variant_name_es(variant: str) -> str:
    return VARIANT_NAMES_ES.get(variant, variant)


# `text.encoder` keys as the book names them (the SigLIP keys all start with "siglip").
TEXT_ENCODER_NAMES_ES = {
    "minilm": "MiniLM (Sentence-BERT)",
    "clip-vit-b-32": "CLIP ViT-B/32",
    "random": "aleatorio (control)",
}


def text_encoder_es(key: Any) -> str:
    """The text encoder a run recorded, by its family rather than its config key."""
    key = str(key)
    return TEXT_ENCODER_NAMES_ES.get(key, "SigLIP" if key.startswith("siglip") else key)


def backbone_of(preset: str) -> str | None:
    return next((k for k in BACKBONE_NAMES_ES if k in preset), None)


def preset_setting(values: dict[str, Any], preset: str, key: str) -> Any:
    """A dotted config `key` as `preset`'s run has it: its ``pipeline.preset_overrides``
    entry, else the config's own value."""
    overrides = ((values.get("pipeline") or {}).get("preset_overrides") or {}).get(preset) or {}
    if key in overrides:
        return overrides[key]
    node: Any = values
    for part in key.split("."):
        node = (node or {}).get(part)
    return node


def backbone_name_es(preset: str, values: dict[str, Any], main: str | None = None) -> str:
    """A Phase 1 preset as every table and figure names it: its backbone family ("DINOv3",
    "ResNet") only when it started from that family's pretrained weights; from random
    weights (``model.init: scratch``) it is the bare architecture, and says so: a randomly
    initialised ViT is not DINOv3."""
    family = backbone_of(preset) or ""
    name = BACKBONE_NAMES_ES.get(family, preset)
    if preset_setting(values, preset, "model.init") == "scratch":
        name = f"{'ViT' if family == 'dinov3' else name}, pesos aleatorios"
    return f"{name} (principal)" if preset == main else name


def model_color(name: str, main: str | None = None, order: Sequence[str] = ()) -> str:
    """The colour of a Phase 2 variant or a Phase 1 preset, the same in every figure."""
    if name == main:
        return PHASE1_COLOR
    if name in MODEL_COLORS:
        return MODEL_COLORS[name]
    backbone = backbone_of(name)
    if backbone in MODEL_COLORS:
        return MODEL_COLORS[backbone]
    i = list(order).index(name) if name in order else len(name)
    return OKABE_ITO[i % len(OKABE_ITO)]
