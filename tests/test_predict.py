"""Tests of `defectfusion predict` and `defectfusion.load(...).predict` (defectfusion.serve.predict):
the evaluation's preprocessing, images of every mode and size, COCO results, drawings, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import defectfusion
from defectfusion.cli import main
from defectfusion.core.errors import UserError
from defectfusion.data.loader import CocoDetection, make_loader
from defectfusion.evaluation import evaluate as ev
from defectfusion.model.checkpoint import load_detector, save_checkpoint
from defectfusion.serve.predict import PALETTE, _text_colour, drawn_name, find_images, to_rgb8

SIZE = 96  # tests/conftest.py's TINY_SIZE


def _test_images(tiny_data: Path) -> list[Path]:
    return sorted((tiny_data / "images" / "test").glob("*.png"))


@pytest.fixture(scope="module")
def mixed(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synth test images in every mode and at other sizes: grey, RGB, RGBA, palette, JPEG,
    16-bit grey (a PNG), non-square."""
    out = tmp_path_factory.mktemp("mixed")
    a, b, c, d = (Image.open(p).convert("RGB") for p in _test_images(tiny_data)[:4])
    a.convert("L").resize((120, 80)).save(out / "grey.png")
    b.save(out / "rgb.png")
    rgba = c.resize((70, 130)).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(out / "rgba.png")
    d.resize((200, 150)).convert("P").save(out / "palette.png")
    a.resize((160, 96)).save(out / "photo.jpg", quality=95)
    grey16 = np.asarray(b.convert("L"), dtype=np.uint16) * 257  # 8-bit 0..255 -> 0..65535
    Image.fromarray(grey16).save(out / "grey16.png")
    (out / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    return out


def contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    def lum(c: tuple[int, int, int]) -> float:
        v = [x / 255 for x in c]
        v = [x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4 for x in v]
        return 0.2126 * v[0] + 0.7152 * v[1] + 0.0722 * v[2]

    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


# ---- images -------------------------------------------------------------------------------


def test_16_bit_images_are_scaled_not_clipped() -> None:
    a = np.array([[0, 257, 32896], [65535, 1000, 60000]], dtype=np.uint16)
    rgb = np.asarray(to_rgb8(Image.fromarray(a)))
    assert rgb.shape == (2, 3, 3)
    assert rgb[..., 0].tolist() == [[0, 1, 128], [255, 4, 233]]
    assert (rgb[..., 0] == rgb[..., 2]).all()
    # Pillow's own conversion clips: what this guards against.
    assert np.asarray(Image.fromarray(a).convert("RGB"))[1, 2, 0] == 255


def test_other_modes_become_rgb() -> None:
    f = Image.fromarray(np.array([[0.0, 0.5], [1.0, 2.0]], dtype=np.float32))
    assert np.asarray(to_rgb8(f))[..., 0].tolist() == [[0, 64], [128, 255]]  # stretched
    assert to_rgb8(Image.new("RGBA", (4, 3), (10, 20, 30, 0))).getpixel((0, 0)) == (10, 20, 30)
    assert to_rgb8(Image.new("L", (4, 3), 77)).getpixel((1, 1)) == (77, 77, 77)
    assert to_rgb8(Image.new("1", (4, 3), 1)).getpixel((1, 1)) == (255, 255, 255)


def test_find_images(mixed: Path, tmp_path: Path) -> None:
    files, root = find_images(mixed)
    assert [p.name for p in files] == sorted(
        ["grey.png", "grey16.png", "palette.png", "photo.jpg", "rgb.png", "rgba.png"]
    )
    assert root == mixed
    files, root = find_images(str(mixed / "*.jpg"))
    assert [p.name for p in files] == ["photo.jpg"] and root == mixed
    assert find_images(mixed / "rgb.png")[0] == [mixed / "rgb.png"]
    with pytest.raises(UserError, match="no such file or folder"):
        find_images(tmp_path / "missing")
    with pytest.raises(UserError, match="no image files in this folder"):
        find_images(tmp_path)
    with pytest.raises(UserError, match="no image files matched"):
        find_images(str(tmp_path / "*.png"))


def test_label_colours_are_legible() -> None:
    """Label text is black or white on the class colour, at WCAG AA contrast (>= 4.5)."""
    for colour in PALETTE:
        assert contrast(colour, _text_colour(colour)) >= 4.5, colour


# ---- the model ----------------------------------------------------------------------------


def test_preprocessing_and_predictions_match_evaluation(tiny_run: Path, tiny_data: Path) -> None:
    """Same pixel values as the evaluation's loader, bit for bit, and the same records."""
    det = defectfusion.load(tiny_run / "best.pt", device="cpu")
    split = tiny_data / "annotations" / "test.json"
    ds = CocoDetection(split, SIZE, train=False)
    images = [Image.open(ds.root / im["file_name"]).convert("RGB") for im in ds.images]
    pixel_values = det.preprocess(images)
    assert torch.equal(pixel_values, torch.stack([ds[i][0] for i in range(len(ds))]))

    model, _ = load_detector(tiny_run / "best.pt")
    # Same batches: CPU kernels may round differently at another batch size.
    want = ev.predict(model, make_loader(split, SIZE, 4, train=False), progress=False)
    got = det.predict([ds.root / im["file_name"] for im in ds.images], threshold=0.0, batch_size=4)
    flat = [
        {
            "image_id": im["id"],
            "category_id": d["category_id"],
            "bbox": [
                round(v, ev.BOX_DECIMALS)
                for v in (
                    d["box"][0],
                    d["box"][1],
                    d["box"][2] - d["box"][0],
                    d["box"][3] - d["box"][1],
                )
            ],
            "score": round(d["score"], ev.SCORE_DECIMALS),
        }
        for im, dets in zip(ds.images, got, strict=True)
        for d in dets
    ]
    assert len(flat) == len(want)
    for a, b in zip(flat, want, strict=True):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert a["score"] == pytest.approx(b["score"], abs=2e-6)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=2e-4)


def test_python_api_inputs(tiny_run: Path, mixed: Path) -> None:
    det = defectfusion.load(tiny_run / "best.pt")
    path = mixed / "rgb.png"
    one = det.predict(path, threshold=0.0)  # batch_size=1 below: the same batches
    assert isinstance(one, list) and one and isinstance(one[0], dict)
    assert set(one[0]) == {"category_id", "label", "score", "box"}
    assert one[0]["label"] == det.class_names[one[0]["category_id"]]
    assert [d["score"] for d in one] == sorted((d["score"] for d in one), reverse=True)
    im = Image.open(path)
    arr = np.asarray(im.convert("RGB"))
    many = det.predict([path, im, arr, str(path)], threshold=0.0, batch_size=1)
    assert len(many) == 4 and all(m == one for m in many)
    assert (
        det.predict(str(mixed / "*.png"), threshold=0.0, batch_size=1)[3] == one
    )  # glob: sorted files
    high = det.predict(path, threshold=0.99)
    assert all(d["score"] >= 0.99 for d in high)
    # 16-bit = the same grey picture at 8 bits, so the same detections (not a white image's).
    g16 = det.predict(mixed / "grey16.png", threshold=0.0)
    g8 = det.predict(Image.open(path).convert("L"), threshold=0.0)
    assert g16 == g8


def test_predict_cli_on_mixed_images(tiny_run: Path, mixed: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "preds"
    code = main(
        ["predict", "--checkpoint", str(tiny_run / "best.pt"), "--images", str(mixed)]
        + ["--out", str(out), "--threshold", "0", "--draw", "--batch-size", "4"]
    )
    assert code == 0
    assert "6 images" in capsys.readouterr().out
    records = json.loads((out / "predictions.json").read_text())
    index = json.loads((out / "images.json").read_text())
    names = {im["id"]: im["file_name"] for im in index["images"]}
    assert sorted(names.values()) == sorted(p.name for p in find_images(mixed)[0])
    for im in index["images"]:  # each image's own size, not the network's
        with Image.open(mixed / im["file_name"]) as pil:
            assert (im["width"], im["height"]) == pil.size
    # Valid COCO results: pycocotools loads them against the image list.
    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = {**index, "annotations": []}
    gt.createIndex()
    res = gt.loadRes(records)
    assert len(res.anns) == len(records) == 100 * len(names)  # threshold 0: every query
    for r in records:
        assert r["file_name"] == names[r["image_id"]]
        assert r["category_name"] == index["categories"][r["category_id"]]["name"]
        assert len(r["bbox"]) == 4 and r["bbox"][2] >= 0 and r["bbox"][3] >= 0
        assert 0.0 <= r["score"] <= 1.0
    # Boxes are in each image's pixels: the widest image has boxes beyond the network's 96 px.
    wide = [r for r in records if r["file_name"] == "palette.png"]
    assert max(r["bbox"][0] + r["bbox"][2] for r in wide) > SIZE
    # Drawings: one per image, at the image's size, with boxes in the class colours.
    for im in index["images"]:
        with Image.open(out / "drawn" / drawn_name(im["file_name"])) as drawn:
            assert drawn.size == (im["width"], im["height"]) and drawn.mode == "RGB"
            if im["file_name"].endswith(".png"):  # (JPEG shifts the colours a little)
                colours = {c for _, c in drawn.getcolors(1 << 20)}
                assert colours & set(PALETTE), im["file_name"]


def test_predict_cli_matches_evaluation_on_any_size(
    tiny_run: Path, mixed: Path, tmp_path: Path
) -> None:
    """The evaluation run on a COCO split of the mixed images (the 16-bit one aside: the
    evaluation's reader clips it) gives the records `predict` wrote."""
    data = tmp_path / "ds"
    (data / "images").mkdir(parents=True)
    (data / "annotations").mkdir()
    files = [p for p in find_images(mixed)[0] if p.name != "grey16.png"]
    images = []
    for i, p in enumerate(files, 1):
        shutil.copy(p, data / "images" / p.name)
        with Image.open(p) as im:
            images.append({"id": i, "file_name": p.name, "width": im.width, "height": im.height})
    _, meta = load_detector(tiny_run / "best.pt")
    cats = [{"id": i, "name": n} for i, n in enumerate(meta["class_names"])]
    split = data / "annotations" / "test.json"
    split.write_text(json.dumps({"images": images, "annotations": [], "categories": cats}))
    model, _ = load_detector(tiny_run / "best.pt")
    want = ev.predict(model, make_loader(split, SIZE, 8, train=False), progress=False)

    shutil.copytree(data / "images", tmp_path / "in")
    out = tmp_path / "preds"
    assert main(["predict", "--checkpoint", str(tiny_run / "best.pt"), "--images",
                 str(tmp_path / "in"), "--out", str(out), "--threshold", "0"]) == 0  # fmt: skip
    got = json.loads((out / "predictions.json").read_text())
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["image_id"] == w["image_id"] and g["category_id"] == w["category_id"]
        assert g["score"] == pytest.approx(w["score"], abs=2e-6)
        assert g["bbox"] == pytest.approx(w["bbox"], abs=2e-4)


def test_phase2_checkpoint_predicts(tiny_run: Path, mixed: Path, tmp_path: Path) -> None:
    from defectfusion.model.fusion import attach_fusion

    model, meta = load_detector(tiny_run / "best.pt")
    text = torch.randn(len(meta["class_names"]), 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    attach_fusion(model, text)
    with torch.no_grad():
        model.fusion.alpha.fill_(0.5)  # the text branch on: predictions must change
    meta2 = {**meta, "phase": 2, "text_shape": list(text.shape), "tau_init": 0.07}
    save_checkpoint(tmp_path / "p2.pt", model.state_dict(), meta2)
    p1 = defectfusion.load(tiny_run / "best.pt").predict(mixed / "rgb.png", threshold=0.0)
    det = defectfusion.load(tmp_path / "p2.pt")
    assert det.phase == 2
    p2 = det.predict(mixed / "rgb.png", threshold=0.0)
    assert len(p2) == len(p1) and p2 != p1
    out = tmp_path / "preds"
    args = ["predict", "--checkpoint", str(tmp_path / "p2.pt"), "--images", str(mixed)]
    assert main([*args, "--out", str(out), "--threshold", "0.0", "--draw"]) == 0
    assert json.loads((out / "predictions.json").read_text())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_predict_on_cuda_matches_cpu(tiny_run: Path, mixed: Path) -> None:
    cpu = defectfusion.load(tiny_run / "best.pt", device="cpu").predict(mixed, threshold=0.0)
    gpu = defectfusion.load(tiny_run / "best.pt", device="cuda").predict(mixed, threshold=0.0)
    for a, b in zip(cpu, gpu, strict=True):  # other kernels: compare the best detections
        assert len(a) == len(b)
        assert a[0]["score"] == pytest.approx(b[0]["score"], abs=1e-3)


def test_user_errors(tiny_run: Path, mixed: Path, tmp_path: Path, capsys) -> None:
    ckpt = str(tiny_run / "best.pt")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png at all")
    cases = [
        (["--images", str(tmp_path / "nope")], "no such file or folder"),
        (["--images", str(tmp_path / "*.png")], "no image files matched"),
        (["--images", str(bad)], "broken.png: cannot read image"),
        (["--images", str(mixed), "--threshold", "1.5"], "threshold 1.5"),
    ]
    for extra, message in cases:
        code = main(["predict", "--checkpoint", ckpt, "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err.replace("\r", "\n")  # (the progress bar's lines)
        errors = [line for line in err.splitlines() if "defectfusion: error:" in line]
        assert code == 2 and len(errors) == 1 and message in errors[0], err
    code = main(["predict", "--checkpoint", str(tmp_path / "x.pt"), "--images", str(mixed),
                 "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "checkpoint not found" in capsys.readouterr().err


def test_one_unreadable_image_is_skipped_with_a_warning(
    tiny_run: Path, mixed: Path, tmp_path: Path, capsys
) -> None:
    """One unreadable image stopped a whole batch (rc 2, issue 28): it is skipped, warned
    about in one line, counted in the summary and listed in images.json."""
    images = tmp_path / "in"
    shutil.copytree(mixed, images)
    (images / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "preds"
    args = ["predict", "--checkpoint", str(tiny_run / "best.pt"), "--images", str(images)]
    assert main([*args, "--out", str(out), "--threshold", "0"]) == 0
    captured = capsys.readouterr()
    warnings = [ln for ln in captured.err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "broken.png: cannot read image" in warnings[0]
    assert "6 images (1 unreadable, skipped)" in captured.out
    index = json.loads((out / "images.json").read_text())
    assert len(index["images"]) == 6 and [s["file_name"] for s in index["skipped"]] == ["broken.png"]
    ids = {r["image_id"] for r in json.loads((out / "predictions.json").read_text())}
    assert ids == {im["id"] for im in index["images"]}  # no id for the skipped image


def test_one_default_threshold_the_model_s_operating_point(
    tiny_run: Path, mixed: Path, tmp_path: Path, capsys
) -> None:
    """predict 0.3, the API none, the exported pipeline 0.5 (issue 28): the CLI and the API
    now default to the model's eval.score_threshold, and the model card names it."""
    det = defectfusion.load(tiny_run / "best.pt")
    _, meta = load_detector(tiny_run / "best.pt")
    assert det.threshold == meta["config"]["eval"]["score_threshold"] == 0.3
    every = det.predict(mixed / "rgb.png", threshold=0.0)
    assert det.predict(mixed / "rgb.png") == [d for d in every if d["score"] >= 0.3]
    out = tmp_path / "preds"
    args = ["predict", "--checkpoint", str(tiny_run / "best.pt"), "--images", str(mixed)]
    assert main([*args, "--out", str(out)]) == 0
    assert "score >= 0.3" in capsys.readouterr().out
    assert json.loads((out / "images.json").read_text())["threshold"] == 0.3
    # A checkpoint evaluated at another operating point keeps it.
    meta2 = {**meta, "config": {**meta["config"], "eval": {**meta["config"]["eval"], "score_threshold": 0.5}}}
    state = load_checkpoint_model(tiny_run / "best.pt")
    save_checkpoint(tmp_path / "op.pt", state, meta2)
    assert defectfusion.load(tmp_path / "op.pt").threshold == 0.5


def load_checkpoint_model(path: Path) -> dict:
    from defectfusion.model.checkpoint import load_checkpoint

    return load_checkpoint(path)["model"]


# ---- the command line around it -------------------------------------------------------------


def test_cli_version_help_defaults_and_examples(capsys) -> None:
    from defectfusion.cli import EXAMPLES, build_parser

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert (
        e.value.code == 0
        and capsys.readouterr().out.strip() == f"defectfusion {defectfusion.__version__}"
    )
    for argv, wanted in (
        (["predict"], ["operating point", "(default: 8)", "example: defectfusion predict"]),
        (["export"], ["(default: hf)", "example: defectfusion export"]),
        (["compare"], ["metrics JSON written by evaluate", "(default: 1000)", "(default: 0)"]),
        (["data", "synth"], ["(default: 800)", "example:"]),
    ):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for w in wanted:
            assert w in out, (argv, w)
        assert "(default: None)" not in out and "(default: False)" not in out
    # Every command with an example names a real command, and every leaf command has one.
    leaves: list[str] = []

    def walk(parser, path: str) -> None:
        import argparse

        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            leaves.append(path)
        for a in subs:
            for name, child in a.choices.items():
                walk(child, f"{path} {name}".strip())

    walk(build_parser(), "")
    assert set(leaves) <= set(EXAMPLES), sorted(set(leaves) - set(EXAMPLES))


def test_set_typo_names_the_unknown_key(capsys) -> None:
    from defectfusion.config import load_config

    with pytest.raises(UserError, match=r"--set 'phase1.epoch=3': unknown key 'phase1.epoch'"):
        load_config(overrides=["phase1.epoch=3"])
    with pytest.raises(UserError, match="unknown key 'nope'; the config has"):
        load_config(overrides=["nope=1"])
    load_config(overrides=["phase1.epochs=3", "figure_style.anything=1"])  # a free-form section
    with pytest.raises(UserError, match="unknown key .pipeline.anything."):
        load_config(overrides=["pipeline.anything=1"])  # typed since issue 11


# ---- --out is written only inside itself, never over what predict did not make (issue 27) ----


def test_out_holding_someone_elses_images_json_is_refused(tmp_path: Path) -> None:
    from defectfusion.serve.predict import WRITTEN_BY, check_out

    out = tmp_path / "out"
    out.mkdir()
    (out / "images.json").write_text('{"mine": true}', encoding="utf-8")
    with pytest.raises(UserError, match="did not write"):
        check_out(out, [], draw=False)
    assert (out / "images.json").read_text(encoding="utf-8") == '{"mine": true}'
    (out / "images.json").write_text(f'{{"written_by": "{WRITTEN_BY}"}}', encoding="utf-8")
    check_out(out, [], draw=False)  # predict's own: a rerun may replace it


def test_links_out_of_out_and_inputs_among_the_drawings_are_refused(tmp_path: Path) -> None:
    from defectfusion.serve.predict import check_out, drawn_path

    photos = tmp_path / "photos"
    photos.mkdir()
    original = photos / "a.png"
    original.write_bytes(b"not touched")
    out = tmp_path / "out"
    out.mkdir()
    (out / "drawn").symlink_to(photos)  # drawings would land on the originals
    with pytest.raises(UserError, match="a link out of --out"):
        check_out(out, [original], draw=True)
    (out / "drawn").unlink()
    (out / "drawn").mkdir()
    inside = out / "drawn" / "b.png"
    inside.write_bytes(b"an input")
    with pytest.raises(UserError, match="where the drawings go"):
        check_out(out, [inside], draw=True)
    (out / "drawn" / "sub").symlink_to(photos)
    with pytest.raises(UserError, match="a link out of"):
        drawn_path(out, "sub/a.png")
    with pytest.raises(UserError, match="outside the images' folder"):
        drawn_path(out, str(original))
    assert drawn_path(out, "x/c.jpg") == out / "drawn" / "x" / "c.jpg"
    assert original.read_bytes() == b"not touched"


def test_an_image_over_the_pixel_cap_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dataset loader's 50 Mpx cap holds for predict too: the size comes from the header
    (eight 12000x12000 PNGs once reached 5 GB before the out-of-memory message)."""
    from PIL import Image

    from defectfusion.data import coco
    from defectfusion.serve.predict import read_image

    path = tmp_path / "big.png"
    Image.new("L", (300, 200)).save(path)
    monkeypatch.setattr(coco, "MAX_IMAGE_PIXELS", 300 * 200 - 1)
    with pytest.raises(UserError, match="Mpx limit"):  # the loader's own message
        read_image(path)
    monkeypatch.setattr(coco, "MAX_IMAGE_PIXELS", 300 * 200)
    assert read_image(path).size == (300, 200)
