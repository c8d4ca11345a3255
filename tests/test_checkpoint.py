"""Tests of defectfusion.model.checkpoint: round trips, refusals of other models and of files that
are not checkpoints (without running their code), and the `evaluate` command's refusals."""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common import NAMES, TINY
from defectfusion.cli import main
from defectfusion.core.errors import UserError
from defectfusion.data import coco
from defectfusion.model.checkpoint import (
    FORMAT,
    check_compatible,
    load_checkpoint,
    load_detector,
    load_model_state,
    save_checkpoint,
)
from defectfusion.model.models import build_model


def meta_for(preset: str = TINY, names: list[str] = NAMES) -> dict:
    return {
        "phase": 1,
        "preset": preset,
        "class_names": names,
        "image_size": 96,
        "critical_classes": [2, 3, 5],
        "composite_weights": {"map": 0.7, "critical_recall": 0.3},
    }


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


# ---- round trip ------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(TINY, NAMES)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = save_checkpoint(
        tmp_path / "sub" / "c.pt",
        model.state_dict(),
        meta_for(),
        optimizer=opt.state_dict(),
        epoch=3,
    )
    assert path == tmp_path / "sub" / "c.pt"
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temporary left behind
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == FORMAT and ckpt["meta"] == meta_for() and ckpt["epoch"] == 3
    state = model.state_dict()
    assert ckpt["model"].keys() == state.keys()
    assert all(torch.equal(ckpt["model"][k], state[k]) for k in state)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 1e-3

    loaded, meta = load_detector(path)
    assert meta == meta_for() and not loaded.training
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_run_checkpoints_load_as_detectors(tiny_run: Path) -> None:
    for name in ("last.pt", "best.pt"):
        model, meta = load_detector(tiny_run / name)
        state = load_checkpoint(tiny_run / name)["model"]
        assert meta["preset"] == TINY and meta["class_names"] == NAMES
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---- other models ----------------------------------------------------------------------


def test_a_checkpoint_s_normalisation_drives_evaluation_prediction_and_export(
    tiny_run: Path, tmp_path: Path
) -> None:
    """`normalize` in the meta decides the input constants everywhere a checkpoint is used; a
    checkpoint from before the key (no `normalize`, no `data.normalize` in its config) was
    trained with ImageNet's, the only ones its loader had. Refusals: tests/test_faults.py."""
    from defectfusion.config import NORMALIZE_CHOICES
    from defectfusion.data.loader import normalization
    from defectfusion.model.checkpoint import input_mean_std, normalize_of
    from defectfusion.serve.export import image_processor
    from defectfusion.serve.predict import Detector

    meta = load_checkpoint(tiny_run / "best.pt")["meta"]
    assert meta["normalize"] == meta["config"]["data"]["normalize"] == "imagenet"
    old = save_checkpoint(tmp_path / "old.pt", {}, meta_for())  # the first version's meta
    assert normalize_of(load_checkpoint(old)["meta"]) == "imagenet"
    model = build_model(TINY, NAMES)
    for name in NORMALIZE_CHOICES:
        m = {**meta_for(), "normalize": name}
        mean, std = (list(v) for v in normalization(name))
        assert input_mean_std(m) == (mean, std)
        det = Detector(model, m, torch.device("cpu"))
        assert (det.mean, det.std) == (mean, std)
        proc = image_processor(m)
        assert (list(proc.image_mean), list(proc.image_std)) == (mean, std)
    # A transformers folder's meta carries its processor's own constants.
    assert input_mean_std({**meta_for(), "mean": [0.1] * 3, "std": [0.2] * 3}) == (
        [0.1] * 3,
        [0.2] * 3,
    )


def test_checkpoint_of_another_preset_is_refused_naming_both() -> None:
    with pytest.raises(UserError) as e:
        check_compatible("c.pt", meta_for("deimv2-resnet-tiny"), TINY, NAMES)
    msg = one_line(e)
    assert "c.pt" in msg and "'deimv2-resnet-tiny'" in msg and f"'{TINY}'" in msg


def test_checkpoint_of_another_class_list_is_refused_naming_both() -> None:
    with pytest.raises(UserError) as e:
        check_compatible("c.pt", meta_for(names=NAMES[:4]), TINY, NAMES)
    msg = one_line(e)
    assert "c.pt" in msg and "4 classes" in msg and "6 classes" in msg
    check_compatible("c.pt", meta_for(), TINY, NAMES)  # the same model passes


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    state = build_model("deimv2-resnet-tiny", NAMES).state_dict()
    path = save_checkpoint(tmp_path / "c.pt", state, meta_for(TINY))  # meta lies about the preset
    with pytest.raises(UserError) as e:
        load_detector(path)
    assert "do not fit" in one_line(e)
    model = build_model(TINY, NAMES)
    with pytest.raises(UserError):
        load_model_state(
            model, {k: v for k, v in model.state_dict().items() if "decoder" not in k}, path
        )
    decoder_missing = {
        k: v for k, v in model.state_dict().items() if not k.startswith("model.decoder")
    }
    load_model_state(model, decoder_missing, path, allow_missing=("model.decoder",))


# ---- files that are not checkpoints ----------------------------------------------------


class Payload:
    """Unpickling this would create `marker`: the test checks it never exists."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _pickled(marker: Path, how: str) -> bytes:
    if how == "pickle":
        return pickle.dumps({"format": FORMAT, "meta": {}, "model": Payload(marker)})
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "meta": {}, "model": Payload(marker)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_object_is_refused_without_running_it(how: str, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    path.write_bytes(_pickled(marker, how))
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(path) in one_line(e)
    assert not marker.exists()
    with pytest.raises(UserError):
        load_detector(path)
    assert not marker.exists()
    pickle.loads(_pickled(marker, "pickle"))  # the payload is real: a plain unpickle runs it
    assert marker.is_dir()


@pytest.mark.parametrize(
    "content",
    [
        np.random.default_rng(0).bytes(4096),
        b"",
        b"not a checkpoint\n",
    ],
    ids=["random", "empty", "text"],
)
def test_unreadable_file_is_refused_in_one_line(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(path) in one_line(e)


@pytest.mark.parametrize("obj", [{"model": {}}, {"format": "other", "model": {}}, [1, 2]])
def test_torch_file_of_another_format_is_refused(obj: object, tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save(obj, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert FORMAT in one_line(e)


def test_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path / "none.pt")
    assert "not found" in one_line(e)


# ---- the evaluate command --------------------------------------------------------------


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def test_evaluate_works_on_its_own_checkpoint(
    tiny_run: Path, tiny_data: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "metrics.json"
    code, _ = _run(
        [
            "evaluate",
            "--checkpoint",
            str(tiny_run / "best.pt"),
            "--data",
            str(coco.split_path(tiny_data, "test")),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0 and out.is_file() and out.with_suffix(".predictions.json").is_file()


def test_evaluate_with_a_checkpoint_of_other_classes_exits_2(
    tiny_run: Path, tiny_data: Path, tmp_path: Path, capsys
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    test = coco.load_json(coco.split_path(data, "test"))
    test["categories"] = test["categories"][:4]
    test["annotations"] = [a for a in test["annotations"] if a["category_id"] < 4]
    coco.write_split(data, "test", test)
    out = tmp_path / "m.json"
    code, err = _run(
        [
            "evaluate",
            "--checkpoint",
            str(tiny_run / "best.pt"),
            "--data",
            str(coco.split_path(data, "test")),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 2 and not out.exists()
    assert (
        err.count("\n") == 1 and "Traceback" not in err and err.startswith("defectfusion: error:")
    )
    assert "differ" in err


@pytest.mark.parametrize("kind", ["other-preset", "random-bytes", "pickle"])
def test_evaluate_with_a_bad_checkpoint_exits_2(
    kind: str, tiny_data: Path, tmp_path: Path, capsys
) -> None:
    ckpt = tmp_path / "c.pt"
    if kind == "other-preset":
        save_checkpoint(ckpt, build_model("deimv2-resnet-tiny", NAMES).state_dict(), meta_for(TINY))
    elif kind == "random-bytes":
        ckpt.write_bytes(np.random.default_rng(1).bytes(1000))
    else:
        ckpt.write_bytes(_pickled(tmp_path / "code-ran", "torch.save"))
    code, err = _run(
        [
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(coco.split_path(tiny_data, "test")),
            "--out",
            str(tmp_path / "m.json"),
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert str(ckpt) in err
    assert not (tmp_path / "code-ran").exists() and not (tmp_path / "m.json").exists()
