"""`defectfusion export`: a trained checkpoint as files other tools can use.

``--format hf`` writes a folder:

- Phase 1: transformers' ``save_pretrained`` (``config.json``, ``model.safetensors``) and the
  image processor transformers pairs with DEIMv2 (``RTDetrImageProcessor``) set to this
  model's input size and normalisation, so
  ``transformers.pipeline("object-detection", model=DIR)`` runs it;
- Phase 2: ``model.safetensors`` (detector + fusion weights) and ``defectfusion.json`` with the
  text embeddings (the fusion is this project's module, not a transformers class, so the
  folder is for `defectfusion.load`);
- both: ``defectfusion.json`` (the checkpoint's meta: classes, input size, training config)
  and ``README.md``, a model card generated from the meta and, if given, the test metrics.

``--format onnx`` writes ``model.onnx`` with torch's exporter (input ``pixel_values``
[B,3,S,S], outputs ``scores`` [B,Q,K] = sigmoid of the class logits and ``boxes`` [B,Q,4]
normalised ``(x0, y0, x1, y1)``), checks it with onnxruntime against PyTorch on the same
input, and records the largest differences in ``defectfusion.json``.

Every folder is written beside OUT and renamed into place, so a failed export leaves no
half-written folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from defectfusion.core.errors import MAX_CLASSES, MAX_IMAGE_SIZE, UserError, is_int, is_number
from defectfusion.core.fsutil import atomic_write_json, atomic_write_text, staged_dir, swap_dir
from defectfusion.core.jsonio import load_json
from defectfusion.core.version import __version__
from defectfusion.data.coco import foreign_files, manifest_writer, write_manifest
from defectfusion.model.checkpoint import (
    check_mean_std,
    check_meta,
    input_mean_std,
    load_detector,
    normalize_of,
    operating_point,
)

FORMATS = ("hf", "onnx")
FORMAT_HF = "defectfusion-hf-v1"
FORMAT_PHASE2 = "defectfusion-phase2-v1"
FORMAT_ONNX = "defectfusion-onnx-v1"
ONNX_TOLERANCE = 1e-4  # largest |ONNX - PyTorch| accepted on scores and boxes
ONNX_OPSET = 18
WEIGHTS_FILE = "model.safetensors"
META_FILE = "defectfusion.json"


def export(
    checkpoint: str | Path,
    out: str | Path,
    fmt: str = "hf",
    metrics: str | Path | None = None,
    tolerance: float = ONNX_TOLERANCE,
) -> dict[str, Any]:
    """Export `checkpoint` to the folder `out` in format `fmt` (``hf`` or ``onnx``)."""

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")
    test_metrics = _read_metrics(metrics) if metrics is not None else None
    model, meta = load_detector(checkpoint)
    out = Path(out)
    if fmt == "hf":
        info = _into_folder(out, lambda tmp: write_hf(model, meta, tmp, test_metrics))
    else:
        info = _into_folder(out, lambda tmp: write_onnx(model, meta, tmp, tolerance))
    return {"out": str(out), **info}


# ---- hf -----------------------------------------------------------------------------------


def image_processor(meta: dict[str, Any]) -> Any:
    """The processor transformers uses for DEIMv2, set to the evaluation's preprocessing:
    a square resize (bilinear, antialiased, no padding), scale to [0, 1], mean/std."""
    from transformers import RTDetrImageProcessor


    s = int(meta["image_size"])
    mean, std = input_mean_std(meta)  # the checkpoint's data.normalize (none: mean 0, std 1)
    return RTDetrImageProcessor(
        size={"height": s, "width": s},
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        image_mean=mean,
        image_std=std,
        do_pad=False,
    )


def write_hf(
    model: nn.Module, meta: dict[str, Any], folder: Path, metrics: dict[str, Any] | None
) -> dict[str, Any]:
    """The hf export of a Phase 1 or Phase 2 model into the (empty) `folder`."""
    phase = int(meta.get("phase", 1))
    record: dict[str, Any] = {"meta": meta, "defectfusion_version": __version__}
    if phase == 2:
        from safetensors.torch import save_model

        # save_model drops the duplicates of tied tensors (DEIMv2 ties its class/box heads),
        # and load_model re-ties them.
        save_model(model, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        record.update(
            format=FORMAT_PHASE2,
            text_embeddings=model.fusion.text.tolist(),  # the frozen class anchors T
        )
    else:
        model.save_pretrained(folder)  # safetensors
        image_processor(meta).save_pretrained(folder)
        record.update(format=FORMAT_HF)
    if metrics is not None:
        record["test_metrics"] = headline(metrics)
    atomic_write_json(folder / META_FILE, record)
    atomic_write_text(folder / "README.md", model_card(meta, metrics, fmt="hf"))
    return {"format": "hf", "phase": phase, "files": sorted(p.name for p in folder.iterdir())}


def load_exported(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model and meta of an hf export folder (Phase 1 or Phase 2), on the CPU, in eval mode.

    A plain transformers DEIMv2 folder (no ``defectfusion.json``) loads too: its classes come
    from ``config.json`` and its input size and normalisation from the image processor.
    """
    folder = Path(folder)
    record = _read_record(folder)
    fmt = record.get("format") if record else None
    if fmt == FORMAT_ONNX:
        raise UserError(
            f"{folder}: an ONNX export; run it with onnxruntime (see its README.md), or export "
            "the checkpoint with --format hf for defectfusion.load"
        )
    if fmt == FORMAT_PHASE2:
        return _load_phase2(folder, record)
    if (folder / "config.json").is_file():
        return _load_transformers(folder, record)
    raise UserError(
        f"{folder}: not a model folder (no {META_FILE} or config.json); pass a checkpoint file "
        "or a folder written by `defectfusion export --format hf`"
    )


# An export folder is as untrusted as a checkpoint (it may come from a shared remote or a
# colleague): every value that sizes an allocation is held to the checkpoint's limits
# (`checkpoint.check_meta`) before anything is built from it.
MAX_RECORD_BYTES = 256 * 2**20  # defectfusion.json: 1000 classes x 8192 dims of text, in JSON
MAX_CONFIG_INT = 16384  # no DEIMv2 or backbone config size comes near (DINOv3-7B: 8192)


def _read_json_file(path: Path, limit: int = MAX_RECORD_BYTES) -> Any:
    """A JSON file of an export folder: size and nesting capped (`core.jsonio.load_json`)."""

    return load_json(path, max_bytes=limit)


def _read_record(folder: Path) -> dict[str, Any] | None:

    p = folder / META_FILE
    if not p.is_file():
        return None
    record = _read_json_file(p)
    if not isinstance(record, dict) or "meta" not in record:
        raise UserError(f"{p}: not a defectfusion export record (no 'meta')")
    if record.get("format") != FORMAT_ONNX:  # any record whose meta may drive a model
        check_meta(p, record["meta"], kind="export")
    if record.get("format") == FORMAT_PHASE2:
        _check_text_embeddings(p, record.get("text_embeddings"), record["meta"]["text_shape"])
    return record


def _check_text_embeddings(path: Path, text: Any, shape: list[int]) -> None:
    """The record's text anchors: exactly the [K, D] finite numbers its meta announces."""
    rows, dims = shape
    ok = (
        isinstance(text, list)
        and len(text) == rows
        and all(isinstance(r, list) and len(r) == dims for r in text)
        and all(is_number(v) for r in text for v in r)
    )
    if not ok:
        raise UserError(
            f"{path}: text_embeddings are not {rows} x {dims} finite numbers (its meta's "
            "text_shape): the folder is corrupt or was not written by defectfusion; re-export it"
        )


def _check_model_config(folder: Path) -> None:
    """config.json may not ask for more than the folder's weights hold.

    Checked before transformers builds the model: every integer is bounded, and the model it
    describes, built on the meta device (no memory), may have at most as many parameters as
    the safetensors files can hold at 2 bytes each; a config inflated by hand is refused
    instead of allocating gigabytes of randomly initialised weights.
    """
    from transformers import Deimv2Config, Deimv2ForObjectDetection

    path = folder / "config.json"
    config = _read_json_file(path, limit=2**20)
    if not isinstance(config, dict) or config.get("model_type") != "deimv2":
        raise UserError(f"{path}: not a DEIMv2 config (model_type {_model_type(config)!r})")
    stack: list[Any] = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif is_int(node) and abs(node) > MAX_CONFIG_INT:
            raise UserError(
                f"{path}: holds the value {node}, above any DEIMv2 size ({MAX_CONFIG_INT}); "
                "the file was edited or corrupted: re-export the model"
            )
    labels = config.get("id2label")
    if isinstance(labels, dict) and len(labels) > MAX_CLASSES:
        raise UserError(f"{path}: {len(labels)} classes, more than {MAX_CLASSES}")
    try:
        cfg = Deimv2Config.from_dict(config)
        with torch.device("meta"):
            n_params = sum(p.numel() for p in Deimv2ForObjectDetection(cfg).parameters())
    except Exception as e:  # noqa: BLE001 - JSON only (nothing executed): a bad value is bad input
        raise UserError(
            f"{path}: not a config transformers can build ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    held = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    if n_params * 2 > held + 2**20:
        raise UserError(
            f"{path}: describes a model of {n_params:,} parameters, more than the folder's "
            f"safetensors files ({held:,} bytes) hold; the config was edited or the weights "
            "are missing: re-export the model"
        )


def _model_type(config: Any) -> Any:
    return config.get("model_type") if isinstance(config, dict) else type(config).__name__


def _load_transformers(
    folder: Path, record: dict[str, Any] | None
) -> tuple[nn.Module, dict[str, Any]]:
    from transformers import Deimv2ForObjectDetection

    from defectfusion.model.models import bars_on_terminal_only  # deferred: loads transformers

    _check_model_config(folder)
    try:
        # use_safetensors: never unpickle weights; no trust_remote_code: DEIMv2 is built in.
        with bars_on_terminal_only():
            model = Deimv2ForObjectDetection.from_pretrained(folder, use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - safetensors and JSON only: nothing is executed,
        # and any failure (a pickle named .safetensors, a truncated file) is the folder's
        raise UserError(
            f"{folder}: cannot load the DEIMv2 model ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    meta = dict(record["meta"]) if record is not None else _meta_from_transformers(folder, model)
    names = meta["class_names"]
    if model.config.num_labels != len(names):
        raise UserError(
            f"{folder}: {META_FILE} lists {len(names)} classes, config.json "
            f"{model.config.num_labels}; the folder was edited: re-export the model"
        )
    return model.eval(), meta


def _meta_from_transformers(folder: Path, model: nn.Module) -> dict[str, Any]:

    proc_file = folder / "preprocessor_config.json"
    proc = _read_json_file(proc_file, limit=2**20) if proc_file.is_file() else {}
    if not isinstance(proc, dict):
        raise UserError(f"{proc_file}: not an image processor config (a JSON object)")
    size = proc.get("size") or {}
    side = size.get("height") if isinstance(size, dict) else None
    if (
        not isinstance(size, dict)
        or side != size.get("width")
        or not is_int(side)
        or not 32 <= side <= MAX_IMAGE_SIZE
        or side % 32
    ):
        raise UserError(
            f"{folder}: needs a square input size, a multiple of 32 in 32..{MAX_IMAGE_SIZE}, in "
            f"preprocessor_config.json (got {size or 'none'})"
        )
    id2label = model.config.id2label
    names = [id2label.get(i) for i in range(len(id2label))]
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise UserError(
            f"{folder / 'config.json'}: id2label must map 0..{len(id2label) - 1} to distinct "
            "non-empty class names"
        )
    meta: dict[str, Any] = {"phase": 1, "class_names": names, "image_size": side}
    if proc.get("do_normalize"):
        meta.update(mean=proc.get("image_mean"), std=proc.get("image_std"))
    else:  # what the processor does: rescale only
        meta.update(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    check_mean_std(proc_file, meta, kind="export")
    return meta


def _load_phase2(folder: Path, record: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_model

    from defectfusion.model.fusion import attach_fusion  # deferred: loads transformers
    from defectfusion.model.models import (  # deferred: loads transformers
        build_model,
        norm_of_checkpoint,
    )

    meta = dict(record["meta"])  # checked by _read_record, with the text embeddings
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{weights}: weights file not found")
    text = torch.tensor(record["text_embeddings"], dtype=torch.float32)
    try:
        with safe_open(str(weights), "pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights}: not a safetensors file ({e.__class__.__name__})") from None
    norm = norm_of_checkpoint(meta, keys)  # as it was trained
    model = build_model(meta["preset"], meta["class_names"], init="scratch", norm=norm)
    attach_fusion(
        model, text, "zero_start", meta.get("tau_init", 0.07), meta.get("fuse_encoder_head", True)
    )
    try:
        load_model(model, str(weights), strict=True)
    except (RuntimeError, OSError, SafetensorError) as e:
        raise UserError(
            f"{weights}: weights do not fit the model ({e.__class__.__name__}: {str(e).splitlines()[0]})"
        ) from None
    # The JSON holds the fusion's (normalised) buffer itself, so the two are equal bit for bit.
    if not torch.equal(model.fusion.text, text):
        raise UserError(f"{folder}: text embeddings in {META_FILE} and {WEIGHTS_FILE} differ")
    return model.eval(), meta


# ---- onnx ---------------------------------------------------------------------------------


class OnnxDetector(nn.Module):
    """The exported graph: pixel_values -> (scores = sigmoid(logits), boxes as normalised
    xyxy). Top-k and the scaling to pixels stay outside (`postprocess_onnx`): they depend on
    each image's size."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=pixel_values)
        cx, cy, w, h = out.pred_boxes.unbind(-1)
        boxes = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
        return out.logits.sigmoid(), boxes


def write_onnx(
    model: nn.Module, meta: dict[str, Any], folder: Path, tolerance: float = ONNX_TOLERANCE
) -> dict[str, Any]:
    import warnings

    s = int(meta["image_size"])
    wrapper = OnnxDetector(model).eval()
    for p in wrapper.parameters():
        p.requires_grad_(False)
    example = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    path = folder / "model.onnx"
    with warnings.catch_warnings():
        # The TorchScript exporter warns about every traced Python branch (shape checks in
        # transformers' code); they are constant for a fixed input size.
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter (dynamo=False): 10x faster here than torch.export's
        # (which also lacks an ONNX translation for the runtime checks in transformers 5.23's
        # DEIMv2) and it keeps the batch dimension dynamic.
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=["pixel_values"],
            output_names=["scores", "boxes"],
            dynamic_axes={
                "pixel_values": {0: "batch"},
                "scores": {0: "batch"},
                "boxes": {0: "batch"},
            },
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    check = check_onnx(wrapper, path, s)
    worst = max(check["max_abs_diff_scores"], check["max_abs_diff_boxes"])
    if not worst <= tolerance:
        raise UserError(
            f"ONNX export differs from PyTorch by {worst:.2e} (> {tolerance:g}) on the check input"
        )

    mean, std = input_mean_std(meta)
    record = {
        "format": FORMAT_ONNX,
        "meta": meta,
        "defectfusion_version": __version__,
        "onnx": {
            "file": path.name,
            "opset": ONNX_OPSET,
            "input": {"pixel_values": ["batch", 3, s, s]},
            "outputs": {
                "scores": ["batch", "queries", len(meta["class_names"])],
                "boxes": ["batch", "queries", 4],
            },
            "mean": mean,
            "std": std,
            "check": {**check, "tolerance": tolerance},
        },
    }
    atomic_write_json(folder / META_FILE, record)
    atomic_write_text(folder / "README.md", model_card(meta, None, fmt="onnx"))
    return {"format": "onnx", "phase": int(meta.get("phase", 1)), **check}


def check_onnx(wrapper: nn.Module, path: Path, image_size: int) -> dict[str, Any]:
    """Run the ONNX file with onnxruntime and PyTorch on the same batch (3 images: not the
    export's batch size, so the dynamic batch is exercised); the largest differences.

    The outputs are compared as sets of queries, as a DETR's detections are: each ONNX query
    is paired with a PyTorch one (optimal assignment on their largest difference) before the
    differences are taken. DEIMv2 orders its queries by encoder score, and a model with
    exactly tied scores (a barely trained one) may list the same queries in another order
    when the rounding differs by one bit; the detections are the same.
    """
    import numpy as np
    import onnxruntime as ort
    from scipy.optimize import linear_sum_assignment

    x = torch.rand(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    x = (x - 0.45) / 0.225  # about the range of normalised images
    with torch.no_grad():
        ref_scores, ref_boxes = (t.numpy() for t in wrapper(x))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores, boxes = session.run(["scores", "boxes"], {"pixel_values": x.numpy()})
    if scores.shape != ref_scores.shape or boxes.shape != ref_boxes.shape:
        raise UserError(
            f"ONNX export: outputs of shape {scores.shape}/{boxes.shape}, PyTorch's are "
            f"{ref_scores.shape}/{ref_boxes.shape}"
        )
    d_scores = d_boxes = 0.0
    reordered = 0
    for b in range(x.shape[0]):
        ref = np.concatenate([ref_scores[b], ref_boxes[b]], axis=-1)
        got = np.concatenate([scores[b], boxes[b]], axis=-1)
        cost = np.abs(ref[:, None, :] - got[None, :, :]).max(axis=-1)
        rows, cols = linear_sum_assignment(cost)
        reordered += int((cols != rows).sum())
        d_scores = max(d_scores, float(np.abs(ref_scores[b][rows] - scores[b][cols]).max()))
        d_boxes = max(d_boxes, float(np.abs(ref_boxes[b][rows] - boxes[b][cols]).max()))
    return {
        "batch": int(x.shape[0]),
        "max_abs_diff_scores": d_scores,
        "max_abs_diff_boxes": d_boxes,
        "queries_in_another_order": reordered,
        "onnxruntime": ort.__version__,
    }


def postprocess_onnx(
    scores: Any, boxes: Any, sizes: list[tuple[int, int]], max_dets: int = 300
) -> list[dict[str, torch.Tensor]]:
    """ONNX outputs -> per-image ``{"scores", "labels", "boxes"}`` (xyxy pixels), best first:
    the same top-k over (query, class) pairs as `evaluate.postprocess`."""
    s = torch.as_tensor(scores)
    b = torch.as_tensor(boxes)
    n, q, k = s.shape
    out = []
    for i in range(n):
        top, idx = s[i].flatten().topk(min(q, max_dets))
        h, w = sizes[i]
        xyxy = b[i][idx // k] * torch.tensor([w, h, w, h], dtype=b.dtype)
        out.append({"scores": top, "labels": idx % k, "boxes": xyxy})
    return out


# ---- model card ---------------------------------------------------------------------------


def _read_metrics(path: str | Path) -> dict[str, Any]:

    m = load_json(path)
    if not isinstance(m, dict) or "map" not in m:
        raise UserError(f"{path}: not a metrics file written by `defectfusion evaluate` (no 'map')")
    return m


HEADLINE = ("map", "map50", "map75", "ar_100", "critical_recall", "critical_recall50", "composite")


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {k: metrics.get(k) for k in HEADLINE if k in metrics}
    for k in ("n_images", "data", "checkpoint"):
        if k in metrics:
            out[k] = metrics[k]
    return out


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def model_card(meta: dict[str, Any], metrics: dict[str, Any] | None, fmt: str) -> str:
    """README.md of an export: what the model is, its data, its test metrics, limits, citation."""

    cfg = meta.get("config") or {}
    data = cfg.get("data") or {}
    dataset = (cfg.get("pipeline") or {}).get("dataset") or {}
    phase = int(meta.get("phase", 1))
    names = list(meta["class_names"])
    critical = [names[i] for i in meta.get("critical_classes", []) if 0 <= i < len(names)]
    s = meta["image_size"]
    op = operating_point(meta)
    title = f"defectfusion {meta.get('preset', 'DEIMv2')} (Phase {phase})"
    lines = [
        "---",
        _card_yaml(meta, metrics, fmt, title).strip(),
        "---",
        "",
        f"# {title}",
        "",
        "A surface-defect detector trained with defectfusion, "
        "the reproducible artifact of a thesis on industrial surface-defect detection. "
        + (
            "Phase 1: transformers' `Deimv2ForObjectDetection` (DEIMv2, a real-time DETR), vision only."
            if phase == 1
            else "Phase 2: the Phase 1 DEIMv2 detector plus a residual vision-language fusion "
            "(`L_final = L_base + alpha * S`, S the cosine similarity of the decoder queries "
            "to frozen text embeddings of the class prompts)."
        ),
        "",
        "## Model",
        "",
        f"- preset: `{meta.get('preset', '?')}`, {meta.get('parameters', '?'):,} parameters"
        if isinstance(meta.get("parameters"), int)
        else f"- preset: `{meta.get('preset', '?')}`",
        f"- input: {s} x {s} RGB, resized without padding (non-square images are stretched), "
        f"scaled to [0, 1], {_normalisation_text(meta)}",
        f"- classes ({len(names)}): " + ", ".join(f"{i} `{n}`" for i, n in enumerate(names)),
        f"- critical classes (recall reported separately): {', '.join(critical) or 'none'}",
    ]
    if phase == 2:
        text = meta.get("text") or {}
        lines.append(
            f"- text encoder: {text.get('encoder', '?')} ({text.get('weights', '?')}); "
            f"variant: {meta.get('variant', {})}"
        )
    if "epoch" in meta:
        lines.append(f"- checkpoint: epoch {meta['epoch']}, selected on validation {_val(meta)}")
    lines += [
        "",
        "## Training data",
        "",
        f"- dataset: `{data.get('dir', '?')}`"
        + (f", made by the pipeline as `{dataset.get('kind')}`" if dataset.get("kind") else ""),
    ]
    if dataset.get("kind") == "synth":
        lines.append(
            "- the procedural metal-surface dataset of defectfusion (the config asks for "
            f"{dataset.get('n_train')}/{dataset.get('n_val')}/{dataset.get('n_test')} "
            f"train/val/test images, seed {dataset.get('seed')}): synthetic images, not "
            "photographs of real parts"
        )
    epochs = (cfg.get(f"phase{phase}") or {}).get("epochs")
    if epochs is not None:
        lines.append(f"- schedule: {epochs} epochs (see `defectfusion.json`, `meta.config`)")
    lines += ["", "## Test metrics", ""]
    if metrics is None:
        lines.append("Not given at export (`defectfusion export --metrics TEST_METRICS.json`).")
    else:
        lines += [
            f"On `{metrics.get('data', '?')}` ({metrics.get('n_images', '?')} images), COCO "
            "evaluation (faster-coco-eval), maxDets 100:",
            "",
            "| metric | value |",
            "|---|---|",
            *(f"| {k} | {_fmt(metrics.get(k))} |" for k in HEADLINE if k in metrics),
        ]
        per_class = metrics.get("per_class") or {}
        if per_class:
            lines += ["", "| class | AP | AP50 | recall | GT boxes |", "|---|---|---|---|---|"]
            lines += [
                f"| {n} | {_fmt(v.get('ap'))} | {_fmt(v.get('ap50'))} | {_fmt(v.get('recall'))} | {v.get('n_gt')} |"
                for n, v in per_class.items()
            ]
    lines += ["", "## Use", ""]
    if fmt == "onnx":
        lines += [
            "```python",
            "import numpy as np, onnxruntime as ort",
            "session = ort.InferenceSession('model.onnx')",
            f"# pixel_values: float32 [B, 3, {s}, {s}], the image resized to {s} x {s},",
            "# divided by 255, minus mean, divided by std (see defectfusion.json: onnx.mean/std)",
            "scores, boxes = session.run(['scores', 'boxes'], {'pixel_values': pixel_values})",
            "# scores [B, Q, K]: probabilities per query and class; boxes [B, Q, 4]: x0, y0, x1, y1",
            "# as fractions of the image: multiply by (width, height, width, height)",
            "```",
        ]
    elif phase == 1:
        lines += [
            "```python",
            "from transformers import pipeline",
            "detector = pipeline('object-detection', model='PATH/TO/THIS/FOLDER')",
            f"detector('image.png', threshold={op:g})  # the pipeline's own default is 0.5",
            "```",
            "",
            "or `defectfusion predict --checkpoint PATH/TO/THIS/FOLDER --images DIR --out OUT --draw`, "
            "or `defectfusion.load('PATH/TO/THIS/FOLDER').predict(['image.png'])`.",
            "",
            "transformers' pipeline reads a 16-bit image by clipping it to 8 bits (most pixels "
            "become white, and it finds nothing): convert such images to 8-bit first, or use "
            "defectfusion, which scales them.",
        ]
    else:
        lines += [
            "```python",
            "import defectfusion",
            "detector = defectfusion.load('PATH/TO/THIS/FOLDER')",
            "detector.predict(['image.png'])",
            "```",
            "",
            "The fusion is defectfusion's module (forward hooks on DEIMv2's class heads), so this "
            "folder needs the `defectfusion` package; transformers alone would run it without "
            "the text branch.",
        ]
    lines += [
        "",
        "## Limits",
        "",
        "- Trained on the data above only: expect lower accuracy on other materials, cameras, "
        "lighting or defect types; check it on your own labelled images before relying on it.",
        f"- The input is resized to {s} x {s}: defects a few pixels wide in large images may "
        "vanish; non-square images are stretched.",
        "- Images are read as 8-bit RGB (16-bit images are scaled down, alpha is dropped).",
        f"- The default score threshold is {op:g}, the operating point the model was evaluated "
        "at (defectfusion's predict and API use it; transformers' pipeline needs it passed). "
        "defectfusion returns boxes as [x0, y0, x1, y1] pixels (its predictions.json as COCO's "
        "[x, y, w, h]); the pipeline as {xmin, ymin, xmax, ymax}.",
        "- Scores are not calibrated probabilities; pick the threshold on validation data. "
        "A missed defect can be costly: it is an aid to inspection, not a replacement for it.",
    ]
    if metrics is not None and (metrics.get("map") or 0) < 0.1:
        lines.append(
            "- Its test mAP is very low: this is a demonstration model (e.g. a CPU or CI run), "
            "not one to use for inspection."
        )
    lines += [
        "",
        "## Citation",
        "",
        "Cite the thesis and this artifact (`CITATION.cff` in the defectfusion repository):",
        "",
        "```bibtex",
        "@thesis{defectfusion_thesis,",
        "  author = {{the defectfusion authors}},",
        "  title = {Detección de defectos superficiales con fusión visión-lenguaje}",
        "}",
        "@software{defectfusion,",
        "  author = {{the defectfusion authors}},",
        "  title = {defectfusion: DEIMv2 + DINOv3 defect detection with residual vision-language fusion},",
        f"  version = {{{meta.get('defectfusion_version', __version__)}}},",
        "  license = {MIT}",
        "}",
        "```",
        "",
    ]
    return "\n".join(lines)


_NORMALISATION_NAMES = {"imagenet": "ImageNet", "clip": "OpenAI CLIP", "siglip": "SigLIP"}


def _card_yaml(meta: dict[str, Any], metrics: dict[str, Any] | None, fmt: str, title: str) -> str:
    """The card's metadata with huggingface_hub's own writer (`ModelCardData`): licence,
    library, task, tags, the dataset, the pretrained weights it started from (``base_model``,
    when a hub id), and the test metrics as a ``model-index`` (`EvalResult`)."""
    from huggingface_hub import EvalResult, ModelCardData

    cfg = meta.get("config") or {}
    dataset = ((cfg.get("pipeline") or {}).get("dataset") or {}).get("kind") or "unknown"
    weights = (cfg.get("model") or {}).get("weights")
    base = (
        weights
        if isinstance(weights, str) and weights.count("/") == 1 and not Path(weights).exists()
        else None
    )
    results = [
        EvalResult(
            task_type="object-detection",
            dataset_type=dataset,
            dataset_name=f"{dataset} (test split)",
            dataset_split="test",
            metric_type=key,
            metric_name=name,
            metric_value=round(float(metrics[key]), 4),
        )
        for key, name in (
            ("map", "mAP@[.5:.95]"),
            ("map50", "mAP@.5"),
            ("critical_recall", "critical recall"),
        )
        if metrics is not None and is_number(metrics.get(key))
    ]
    phase = int(meta.get("phase", 1))
    data = ModelCardData(
        license="mit",
        library_name="transformers" if phase == 1 and fmt == "hf" else "defectfusion",
        pipeline_tag="object-detection",
        tags=["object-detection", "deimv2", "defect-detection", "defectfusion"],
        datasets=[dataset],
        base_model=base,
        model_name=title if results else None,
        eval_results=results or None,
    )
    return data.to_yaml()


def _normalisation_text(meta: dict[str, Any]) -> str:
    """How the model card says the input is normalised (the checkpoint's data.normalize)."""

    if meta.get("mean") is None or meta.get("std") is None:
        name = normalize_of(meta)
        if name == "none":
            return "not normalised (mean 0, std 1)"
        if name in _NORMALISATION_NAMES:
            return f"normalised with the {_NORMALISATION_NAMES[name]} mean and std"
    mean, std = input_mean_std(meta)
    return f"normalised with mean {mean} and std {std}"


def _val(meta: dict[str, Any]) -> str:
    val = meta.get("val") or {}
    keys = [k for k in ("map", "composite") if isinstance(val.get(f"val_{k}"), int | float)]
    selected = (
        (meta.get("config") or {}).get(f"phase{meta.get('phase', 1)}", {}).get("select_metric")
    )
    what = f"{selected}; " if selected else ""
    return what + (", ".join(f"{k} {val[f'val_{k}']:.3f}" for k in keys) or "metrics")


# ---- writing a folder atomically ----------------------------------------------------------


def _replaceable(out: Path) -> None:
    """An existing `out` is replaced only when it is empty or an earlier export holding
    nothing but the files its manifest lists (`coco.foreign_files`, the datasets' own rule):
    never a user's file put beside them."""

    if out.is_symlink():
        raise UserError(f"--out {out}: is a link; choose a real folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / META_FILE).is_file() or manifest_writer(out) != EXPORT_WRITER:
        raise UserError(f"--out {out}: folder exists and is not an earlier export; choose another")
    extra = [p.relative_to(out).as_posix() for p in foreign_files(out)]
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise UserError(
            f"--out {out}: holds files the export did not write ({shown}); move them or "
            "choose another --out (nothing was changed)"
        )


EXPORT_WRITER = "export"  # the writer its manifest names (coco.write_manifest)


def _into_folder(out: Path, write: Any) -> dict[str, Any]:
    """Write into a staging folder beside `out`, list what it wrote (the manifest), then swap
    it in (`fsutil.staged_dir`/`swap_dir`: the earlier export goes to a temporary named by
    this process, never to a fixed name a user's folder could have); `_replaceable` says when
    an existing `out` may go."""

    _replaceable(out)
    with staged_dir(out) as tmp:
        info = write(tmp)
        write_manifest(tmp, EXPORT_WRITER)
        swap_dir(tmp, out)
    return info
