"""Tests of `defectfusion export` (defectfusion.serve.export): the transformers folder and its model
card against transformers' own pipeline, ONNX against PyTorch, the Phase 2 round trip."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import defectfusion
from defectfusion.cli import main
from defectfusion.evaluation import evaluate as ev
from defectfusion.model.checkpoint import load_detector, save_checkpoint
from defectfusion.serve.export import OnnxDetector, postprocess_onnx
from defectfusion.serve.predict import read_image

# transformers' pipeline gives integer boxes (it truncates the coordinates), and its image
# processor rescales and normalises in one fused step: scores agree to float rounding.
PIPELINE_SCORE_TOL = 1e-5
PIPELINE_BOX_TOL = 1.0  # pixels
ONNX_TOL = 1e-4


def _test_images(tiny_data: Path) -> list[Path]:
    return sorted((tiny_data / "images" / "test").glob("*.png"))


@pytest.fixture(scope="module")
def metrics(tiny_run: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("metrics") / "test_metrics.json"
    ev.evaluate_checkpoint(tiny_run / "best.pt", tiny_data / "annotations" / "test.json", out)
    return out


@pytest.fixture(scope="module")
def hf_dir(tiny_run: Path, metrics: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    args = ["export", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(out)]
    assert main([*args, "--format", "hf", "--metrics", str(metrics)]) == 0
    return out


def phase2_checkpoint(tiny_run: Path, path: Path) -> Path:
    """A Phase 2 checkpoint of the tiny run: fusion attached, gate open, trained-looking."""
    from defectfusion.model.fusion import attach_fusion

    model, meta = load_detector(tiny_run / "best.pt")
    text = torch.randn(len(meta["class_names"]), 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    attach_fusion(model, text)
    with torch.no_grad():
        model.fusion.alpha.fill_(0.4)
        model.fusion.log_tau.fill_(-1.5)
    meta2 = {
        **meta,
        "phase": 2,
        "text_shape": list(text.shape),
        "tau_init": 0.07,
        "fuse_encoder_head": True,
        "text": {"encoder": "random", "weights": "tests"},
    }
    save_checkpoint(path, model.state_dict(), meta2)
    return path


# ---- hf -----------------------------------------------------------------------------------


def test_hf_export_files_and_model_card(hf_dir: Path, metrics: Path) -> None:
    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= names
    assert {"README.md", "defectfusion.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)  # safetensors only
    proc = json.loads((hf_dir / "preprocessor_config.json").read_text())
    assert proc["image_processor_type"].startswith("RTDetrImageProcessor")
    assert proc["size"] == {"height": 96, "width": 96} and proc["do_normalize"] is True
    assert proc["image_mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert proc["do_pad"] is False
    config = json.loads((hf_dir / "config.json").read_text())
    record = json.loads((hf_dir / "defectfusion.json").read_text())
    names = record["meta"]["class_names"]
    assert [config["id2label"][str(i)] for i in range(len(names))] == names
    card = (hf_dir / "README.md").read_text()
    m = json.loads(metrics.read_text())
    for text in ("pipeline_tag: object-detection", "## Training data", "## Test metrics",
                 "## Limits", "## Citation", f"| map | {m['map']:.3f} |", "deimv2-dinov3-tiny",
                 *names):  # fmt: skip
        assert text in card, text
    assert f"`{record['meta']['config']['data']['dir']}`" in card  # what it was trained on
    assert record["test_metrics"]["map"] == m["map"]
    # The metadata, read back by huggingface_hub: the dataset and a model-index with the
    # test metrics (issue 28); the card names the one default threshold and the box format.
    from huggingface_hub import ModelCard

    data = ModelCard.load(hf_dir / "README.md").data
    assert data.datasets == ["synth"] and data.pipeline_tag == "object-detection"
    assert {r.metric_type: r.metric_value for r in data.eval_results}["map"] == round(m["map"], 4)
    assert "threshold=0.3" in card and "[x0, y0, x1, y1]" in card and "16-bit" in card


def test_hf_export_in_transformers_pipeline_matches_predict(
    hf_dir: Path, tiny_run: Path, tiny_data: Path
) -> None:
    from transformers import pipeline

    pipe = pipeline("object-detection", model=str(hf_dir), device="cpu")
    det = defectfusion.load(tiny_run / "best.pt")
    worst_score = worst_box = 0.0
    for path in _test_images(tiny_data):
        ours = det.predict(path, threshold=0.0)
        theirs = pipe(str(path), threshold=0.0)
        assert len(theirs) == len(ours) == 100
        for t in theirs:
            box = [t["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")]
            close = [
                (
                    abs(t["score"] - o["score"]),
                    max(abs(a - b) for a, b in zip(box, o["box"], strict=True)),
                )
                for o in ours
                if o["label"] == t["label"]
            ]
            ds, db = min(
                close, key=lambda c: max(c[0] / PIPELINE_SCORE_TOL, c[1] / PIPELINE_BOX_TOL)
            )
            worst_score, worst_box = max(worst_score, ds), max(worst_box, db)
    assert worst_score <= PIPELINE_SCORE_TOL, worst_score
    assert worst_box <= PIPELINE_BOX_TOL, worst_box


def test_hf_export_loads_in_defectfusion(
    hf_dir: Path, tiny_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    images = _test_images(tiny_data)
    want = defectfusion.load(tiny_run / "best.pt").predict(images, threshold=0.0)
    assert defectfusion.load(hf_dir).predict(images, threshold=0.0) == want
    # A plain transformers folder (no defectfusion.json): classes, input size and
    # normalisation come from config.json and the image processor.
    plain = tmp_path / "plain"
    shutil.copytree(hf_dir, plain)
    (plain / "defectfusion.json").unlink()
    det = defectfusion.load(plain)
    assert (
        det.image_size == 96
        and det.class_names
        == json.loads((hf_dir / "defectfusion.json").read_text())["meta"]["class_names"]
    )
    assert det.predict(images, threshold=0.0) == want


def test_export_refuses_bad_input(tiny_run: Path, hf_dir: Path, tmp_path: Path, capsys) -> None:
    ckpt = str(tiny_run / "best.pt")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.docx").write_text("precious")
    assert main(["export", "--checkpoint", ckpt, "--out", str(mine)]) == 2
    assert "not an earlier export" in capsys.readouterr().err
    assert (mine / "thesis.docx").read_text() == "precious"
    not_metrics = tmp_path / "x.json"
    not_metrics.write_text("[]")
    args = ["export", "--checkpoint", ckpt, "--out", str(tmp_path / "o")]
    assert main([*args, "--metrics", str(not_metrics)]) == 2
    assert "not a metrics file" in capsys.readouterr().err
    assert (
        main(["export", "--checkpoint", str(tmp_path / "no.pt"), "--out", str(tmp_path / "o")]) == 2
    )
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.*"))  # no half-written folder left behind


# ---- onnx ---------------------------------------------------------------------------------


def test_onnx_export_matches_pytorch(tiny_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    import onnxruntime as ort
    from scipy.optimize import linear_sum_assignment

    out = tmp_path / "onnx"
    args = ["export", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(out)]
    assert main([*args, "--format", "onnx"]) == 0
    record = json.loads((out / "defectfusion.json").read_text())
    check = record["onnx"]["check"]
    assert check["max_abs_diff_scores"] <= ONNX_TOL and check["max_abs_diff_boxes"] <= ONNX_TOL
    assert "## Use" in (out / "README.md").read_text()

    # Independently, on real images at another batch size (the batch axis is dynamic).
    det = defectfusion.load(tiny_run / "best.pt")
    images = [read_image(p) for p in _test_images(tiny_data)]
    x = det.preprocess(images)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    scores, boxes = session.run(["scores", "boxes"], {"pixel_values": x.numpy()})
    with torch.no_grad():
        ref_scores, ref_boxes = (t.numpy() for t in OnnxDetector(det.model)(x))
    for b in range(len(images)):
        # Queries compared as a set: exactly tied encoder scores may list them in another order.
        ref = np.concatenate([ref_scores[b], ref_boxes[b]], -1)
        got = np.concatenate([scores[b], boxes[b]], -1)
        rows, cols = linear_sum_assignment(np.abs(ref[:, None] - got[None]).max(-1))
        assert np.abs(ref_scores[b][rows] - scores[b][cols]).max() <= ONNX_TOL
        assert np.abs(ref_boxes[b][rows] - boxes[b][cols]).max() <= ONNX_TOL
    # The same detections after post-processing.
    sizes = [(im.height, im.width) for im in images]
    ours = det.predict(images, threshold=0.0)
    for d, o in zip(postprocess_onnx(scores, boxes, sizes), ours, strict=True):
        assert d["scores"].numpy() == pytest.approx([x["score"] for x in o], abs=ONNX_TOL)


# ---- Phase 2 ------------------------------------------------------------------------------


def test_phase2_export_round_trip(tiny_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    ckpt = phase2_checkpoint(tiny_run, tmp_path / "p2.pt")
    out = tmp_path / "p2"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--format", "hf"]) == 0
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "defectfusion.json",
        "README.md",
        ".defectfusion-files.json",  # what a re-export may replace (export.MANIFEST)
    }
    record = json.loads((out / "defectfusion.json").read_text())
    assert record["format"] == "defectfusion-phase2-v1"
    assert np.array(record["text_embeddings"]).shape == (6, 16)

    original, _ = load_detector(ckpt)
    loaded = defectfusion.load(out)
    assert loaded.phase == 2
    assert torch.equal(loaded.model.fusion.text, original.fusion.text)
    assert float(loaded.model.fusion.alpha) == pytest.approx(0.4)
    state, want = loaded.model.state_dict(), original.state_dict()
    assert state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) for k in want)
    images = _test_images(tiny_data)
    assert loaded.predict(images, threshold=0.0) == defectfusion.load(ckpt).predict(
        images, threshold=0.0
    )
    # ... and the fusion is really in use: without it the predictions differ.
    p1 = defectfusion.load(tiny_run / "best.pt").predict(images, threshold=0.0)
    assert loaded.predict(images, threshold=0.0) != p1
    assert "Phase 2" in (out / "README.md").read_text()


def test_a_re_export_never_deletes_what_the_export_did_not_write(tmp_path: Path) -> None:
    """Re-exporting into an earlier export removed the user's NOTES.txt and eval/report.txt,
    and a user's folder named like the old fixed backup name was deleted (issue 27)."""
    from defectfusion.core.errors import UserError
    from defectfusion.serve.export import META_FILE, _into_folder

    def write(folder: Path) -> dict:
        (folder / META_FILE).write_text("{}", encoding="utf-8")
        (folder / "model.safetensors").write_bytes(b"w")
        return {}

    out = tmp_path / "export"
    backup = tmp_path / ".export.old"  # the user's, named like the old backup
    backup.mkdir()
    (backup / "keep.txt").write_text("mine", encoding="utf-8")
    _into_folder(out, write)
    _into_folder(out, write)  # an export replaces its own
    assert sorted(p.name for p in out.iterdir()) == [
        ".defectfusion-files.json",
        META_FILE,
        "model.safetensors",
    ]
    (out / "eval").mkdir()
    (out / "eval" / "report.txt").write_text("mine", encoding="utf-8")
    (out / "NOTES.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match="did not write .*NOTES.txt"):
        _into_folder(out, write)
    assert (out / "NOTES.txt").read_text(encoding="utf-8") == "mine"
    assert (out / "eval" / "report.txt").is_file()
    assert (backup / "keep.txt").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.old", "export"]


# ---- tampered export folders (issue 27) ---------------------------------------------------


def _edit_json(name: str, change) -> object:
    def edit(folder: Path) -> None:
        p = folder / name
        data = json.loads(p.read_text(encoding="utf-8"))
        change(data)
        p.write_text(json.dumps(data), encoding="utf-8")

    return edit


def _set(*keys: str, value: object):
    def change(data: dict) -> None:
        for k in keys[:-1]:
            data = data[k]
        data[keys[-1]] = value

    return change


def _write(name: str, content: bytes):
    return lambda folder: (folder / name).write_bytes(content)


def _pickle_weights(folder: Path) -> None:
    """A pickle named like safetensors, as large as the real file (so only its format is
    wrong)."""
    import io

    weights = folder / "model.safetensors"
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(weights.stat().st_size // 4)}, buf)
    weights.write_bytes(buf.getvalue())


def _plain(edit):
    """The same edit on a plain transformers folder (its defectfusion.json removed)."""

    def both(folder: Path) -> None:
        (folder / "defectfusion.json").unlink()
        edit(folder)

    return both


# Each: how a Phase 1 hf export is damaged, and a word of the one-line refusal.
TAMPERED_EXPORTS = {
    "image_size as a string": (
        _edit_json("defectfusion.json", _set("meta", "image_size", value="96")),
        "image_size",
    ),
    "image_size 32768": (
        _edit_json("defectfusion.json", _set("meta", "image_size", value=32768)),
        "image_size",
    ),
    "short class list": (
        _edit_json("defectfusion.json", lambda d: d["meta"]["class_names"].pop()),
        "classes",
    ),
    "class names of the wrong type": (
        _edit_json("defectfusion.json", _set("meta", "class_names", value=[1, 2, 3])),
        "class_names",
    ),
    "deep JSON": (_write("defectfusion.json", b"[" * 100_000 + b"]" * 100_000), "nested"),
    "meta not a mapping": (
        _write("defectfusion.json", b'{"meta": 7, "format": "defectfusion-hf-v1"}'),
        "meta",
    ),
    "pickle named .safetensors": (_pickle_weights, "cannot load"),
    "huge config value": (_edit_json("config.json", _set("d_model", value=10**9)), "above"),
    "inflated config within bounds": (
        _edit_json("config.json", _set("decoder_ffn_dim", value=16384)),
        "parameters",
    ),
    "config of another model": (
        _edit_json("config.json", _set("model_type", value="bert")),
        "DEIMv2",
    ),
    "zero std (plain folder)": (
        _plain(_edit_json("preprocessor_config.json", _set("image_std", value=[0, 0, 0]))),
        "std",
    ),
    "std of strings (plain folder)": (
        _plain(_edit_json("preprocessor_config.json", _set("image_std", value="abc"))),
        "std",
    ),
    "record without a format": (
        _edit_json(
            "defectfusion.json", lambda d: (d.pop("format"), d["meta"].update(image_size=32768))
        ),
        "image_size",
    ),
    "class ids with a gap (plain folder)": (
        _plain(
            _edit_json(
                "config.json",
                _set(
                    "id2label", value={"0": "a", "2": "b", "3": "c", "4": "d", "5": "e", "6": "f"}
                ),
            )
        ),
        "id2label|classes",
    ),
    "input size 100000 (plain folder)": (
        _plain(
            _edit_json(
                "preprocessor_config.json", _set("size", value={"height": 100000, "width": 100000})
            )
        ),
        "input size",
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERED_EXPORTS))
def test_a_tampered_export_folder_is_one_line(
    case: str, hf_dir: Path, tiny_data: Path, tmp_path: Path, capsys
) -> None:
    """Nine forms of a hand-edited export gave ValueError, TypeError, IndexError,
    RecursionError, SafetensorError or RuntimeError tracebacks, and image_size 32768 allocated
    3.2 GB, in `predict` and `defectfusion.load` alike (issue 27): each is one line now, before
    anything is allocated."""
    from defectfusion.core.errors import UserError

    edit, word = TAMPERED_EXPORTS[case]
    folder = tmp_path / "export"
    shutil.copytree(hf_dir, folder)
    edit(folder)
    with pytest.raises(UserError, match=word) as e:
        defectfusion.load(folder)
    assert "\n" not in str(e.value)
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(_test_images(tiny_data)[0], images)
    capsys.readouterr()
    args = ["predict", "--checkpoint", str(folder), "--images", str(images)]
    assert main([*args, "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("defectfusion: error:") and "\n" not in err, err
    assert word.lower() in err.lower() or re.search(word, err)
    assert not (tmp_path / "p").exists()  # nothing written


def _phase2_folder(tiny_run: Path, tmp_path: Path) -> Path:
    ckpt = phase2_checkpoint(tiny_run, tmp_path / "p2.pt")
    out = tmp_path / "p2"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--format", "hf"]) == 0
    return out


TAMPERED_PHASE2 = {
    "text rows missing": (lambda d: d["text_embeddings"].pop(), "text_embeddings"),
    "text of strings": (lambda d: d["text_embeddings"][0].__setitem__(0, "x"), "text_embeddings"),
    "text NaN": (lambda d: d["text_embeddings"][0].__setitem__(0, float("nan")), "text_embeddings"),
    "short class list": (lambda d: d["meta"]["class_names"].pop(), "critical_classes|text_shape"),
    "huge text_shape": (_set("meta", "text_shape", value=[6, 10**9]), "text_shape"),
    "unknown preset": (_set("meta", "preset", value="../x"), "preset"),
}


def test_a_tampered_phase2_export_is_one_line(tiny_run: Path, tmp_path: Path) -> None:
    from defectfusion.core.errors import UserError

    good = _phase2_folder(tiny_run, tmp_path)
    for case, (change, word) in TAMPERED_PHASE2.items():
        folder = tmp_path / case.replace(" ", "_")
        shutil.copytree(good, folder)
        _edit_json("defectfusion.json", change)(folder)
        with pytest.raises(UserError, match=word) as e:
            defectfusion.load(folder)
        assert "\n" not in str(e.value), case
    folder = tmp_path / "pickle"
    shutil.copytree(good, folder)
    _pickle_weights(folder)
    with pytest.raises(UserError, match="not a safetensors file"):
        defectfusion.load(folder)
