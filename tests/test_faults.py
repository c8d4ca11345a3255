"""Fault injection: every kind of failure the fault catalogue (issue 16) found, one test or more.

Kinds: data loss (outputs that contain inputs, interrupted regeneration, stale temporaries,
fsync), hostile files (checkpoint meta driving allocation, NaN weights, corrupt safetensors,
YAML alias bombs, decompression bombs, deep JSON), data checked where it is used, config
ranges, and OS errors. Each asserts the one-line `UserError` (or exit 2 with one stderr line)
and that nothing the user owns was touched. Hostile inputs are built here, byte by byte where
it matters (a PNG header claiming 400 Mpx, nested aliases, nested brackets); none is large on
disk, and none is ever expanded by the code under test.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import NAMES, TINY
from defectfusion.cli import main
from defectfusion.config import load_config, read_yaml
from defectfusion.core import fsutil
from defectfusion.core.errors import UserError
from defectfusion.data import coco
from defectfusion.data.importers import import_coco
from defectfusion.data.loader import CocoDetection
from defectfusion.data.synth import SynthSpec, generate
from defectfusion.data.validate import validate_path
from defectfusion.model.checkpoint import (
    load_checkpoint,
    load_detector,
    load_model_state,
    save_checkpoint,
)

SMALL = SynthSpec(seed=0, n_train=3, n_val=2, n_test=2, image_size=64)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def assert_exit_2_one_line(code: int, err: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()  # a progress bar may come first
    assert lines[-1].startswith("defectfusion: error: "), err
    assert sum("defectfusion" in line for line in lines) == 1 and "Traceback" not in err


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def dead_pid() -> int:
    """The pid of a process that has exited (a writer killed with -9 looks the same)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---- COCO sources for the importer -------------------------------------------------------


def coco_source(root: Path, n: int = 6, crowd: bool = False) -> tuple[Path, Path]:
    """`root/images/*.png` and `root/ann.json` (one box per image, classes a and b)."""
    images = root / "images"
    images.mkdir(parents=True)
    imgs, anns = [], []
    for i in range(1, n + 1):
        Image.new("RGB", (40, 30), (i * 20, 50, 50)).save(images / f"im{i}.png")
        imgs.append({"id": i, "file_name": f"im{i}.png", "width": 40, "height": 30})
        anns.append(
            {
                "id": i,
                "image_id": i,
                "category_id": 1 + i % 2,
                "bbox": [2, 3, 10, 8],
                "area": 80,
                "iscrowd": int(crowd),
            }
        )
    ann = root / "ann.json"
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    ann.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats}))
    return images, ann


# ---- data loss ---------------------------------------------------------------------------


def test_import_coco_refuses_an_out_that_contains_its_images(tmp_path: Path, capsys) -> None:
    """The catalogue's worst case: `--images DIR/images --out DIR` deleted DIR's other files."""
    root = tmp_path / "DIR"
    images, ann = coco_source(root)
    (images / "README.txt").write_text("mine")
    Image.new("RGB", (40, 30)).save(images / "unlabelled.png")
    before = tree_digest(root)
    code, err = run_cli(
        [
            "data",
            "import-coco",
            "--images",
            str(images),
            "--annotations",
            str(ann),
            "--out",
            str(root),
        ],
        capsys,
    )
    assert_exit_2_one_line(code, err)
    assert "contains the input" in err
    assert tree_digest(root) == before


def test_import_coco_refuses_to_replace_a_dataset_holding_files_it_does_not_list(
    tmp_path: Path,
) -> None:
    images, ann = coco_source(tmp_path / "src")
    out = tmp_path / "ds"
    import_coco(images, [ann], out)
    (out / "images" / "notes.txt").write_text("mine")  # added by the user afterwards
    before = tree_digest(out)
    with pytest.raises(UserError) as e:
        import_coco(images, [ann], out)
    assert "notes.txt" in one_line(e) and "delete" in one_line(e)
    assert tree_digest(out) == before


def test_import_coco_of_only_crowd_annotations_is_refused(tmp_path: Path) -> None:
    images, ann = coco_source(tmp_path / "src", crowd=True)
    with pytest.raises(UserError) as e:
        import_coco(images, [ann], tmp_path / "out")
    assert "iscrowd" in one_line(e)
    assert not (tmp_path / "out").exists()


def test_import_neu_refuses_an_out_that_is_its_source(tmp_path: Path) -> None:
    from defectfusion.data.importers import import_neu

    src = tmp_path / "neu"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    with pytest.raises(UserError, match="contains the input"):
        import_neu(src, src)


def test_synth_interrupted_while_regenerating_leaves_the_old_dataset_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill half-way (here: while writing the val JSON) must not mix two seeds."""
    out = tmp_path / "ds"
    generate(out, SMALL)
    before = tree_digest(out)
    real = coco.write_split

    def killed_at_val(root, split, data):
        if split == "val":
            raise KeyboardInterrupt
        return real(root, split, data)

    monkeypatch.setattr(coco, "write_split", killed_at_val)
    with pytest.raises(KeyboardInterrupt):
        generate(out, SynthSpec(**{**SMALL.__dict__, "seed": 1}))
    assert tree_digest(out) == before
    assert validate_path(out).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no staging left behind


def test_synth_refuses_to_replace_a_dataset_holding_user_files(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    generate(out, SMALL)
    (out / "images" / "train" / "my_photo.jpg").write_bytes(b"mine")
    with pytest.raises(UserError) as e:
        generate(out, SynthSpec(**{**SMALL.__dict__, "seed": 1}))
    assert "my_photo.jpg" in one_line(e)
    assert (out / "images" / "train" / "my_photo.jpg").read_bytes() == b"mine"


def test_a_dataset_whose_split_jsons_a_runner_removed_can_be_remade(tmp_path: Path) -> None:
    """Snakemake deletes a job's outputs (the split JSONs) before it reruns `data`: the images
    left are still ours (the manifest lists them), so the writers may replace them."""
    images, ann = coco_source(tmp_path / "src")
    for out, make in (
        (tmp_path / "synth", lambda out: generate(out, SMALL)),
        (tmp_path / "imported", lambda out: import_coco(images, [ann], out)),
    ):
        make(out)
        for split in coco.SPLITS:
            coco.split_path(out, split).unlink()
        make(out)
        assert validate_path(out).ok
        (out / "images" / "mine.png").write_bytes(b"x")  # but never a file it did not make
        for split in coco.SPLITS:
            coco.split_path(out, split).unlink()
        with pytest.raises(UserError, match="mine.png"):
            make(out)
        assert (out / "images" / "mine.png").read_bytes() == b"x"


def test_a_killed_synth_run_s_staging_folder_is_removed_by_the_next_run(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    stale = tmp_path / f"{fsutil.temp_prefix('ds', dead_pid())}abc.tmp"
    (stale / "images").mkdir(parents=True)
    (stale / "images" / "x.png").write_bytes(b"half")
    generate(out, SMALL)
    assert not stale.exists() and validate_path(out).ok


def _children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc; zombies count as gone)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def _wait_for(condition, limit_s: float) -> bool:
    """Poll `condition` until it holds or `limit_s` passes (a generous bound on a slow or
    loaded machine, not a timing claim: the test asserts that it happens, not how fast)."""
    import time

    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_synth_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    """After `kill -9` of `data synth`, its workers and the resource tracker stayed alive for
    ten minutes (issue 27): they now die with it."""
    import sys

    code = (
        "from defectfusion.data.synth import SynthSpec, generate; "
        f"generate({str(tmp_path / 'ds')!r}, "
        "SynthSpec(seed=0, n_train=100000, n_val=2, n_test=2, image_size=64), workers=2)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        # the two workers (and the resource tracker) are running
        assert _wait_for(lambda: len(_children(parent.pid)) >= 3, 120), _children(parent.pid)
        kids = _children(parent.pid)
    finally:
        parent.kill()
        parent.wait()
    assert _wait_for(lambda: not any(_alive(k) for k in kids), 60), [
        k for k in kids if _alive(k)
    ]


def test_stale_checkpoint_temporaries_are_removed_live_ones_kept(tmp_path: Path) -> None:
    dead = tmp_path / f"{fsutil.temp_prefix('last.pt', dead_pid())}k3j2.tmp"
    old_style = tmp_path / ".last.pt.x8f2q1.tmp"  # mkstemp's name before host-pid names
    live = tmp_path / f"{fsutil.temp_prefix('last.pt', os.getppid())}zz.tmp"
    other = tmp_path / f"{fsutil.temp_prefix('best.pt', dead_pid())}k3j2.tmp"
    for p in (dead, old_style, live, other):
        p.write_bytes(b"x" * 100)
    hour_ago = os.path.getmtime(old_style) - 2 * fsutil.STALE_FILE_AGE_S
    os.utime(old_style, (hour_ago, hour_ago))
    save_checkpoint(tmp_path / "last.pt", {"w": torch.zeros(2)}, meta_for())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["last.pt", live.name, other.name])


def test_atomic_write_fsyncs_the_file_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1]
    )
    fsutil.atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert "replace" in events and "fsync" in events[: events.index("replace")]
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}


# ---- hostile checkpoints -----------------------------------------------------------------


def meta_for(**changes: object) -> dict:
    meta = {
        "phase": 1,
        "preset": TINY,
        "class_names": NAMES,
        "image_size": 96,
        "critical_classes": [2, 3, 5],
        "composite_weights": {"map": 0.7, "critical_recall": 0.3},
    }
    return {**meta, **changes}


HOSTILE_META = {
    "not-a-dict": ["phase", 1],
    "huge-text-shape": meta_for(phase=2, text_shape=[6, 10**12]),  # old code: a 4 TB torch.zeros
    "text-shape-of-other-classes": meta_for(phase=2, text_shape=[7, 384]),
    "text-shape-not-ints": meta_for(phase=2, text_shape=["6", 384]),
    "huge-image-size": meta_for(image_size=2**20),  # old code: evaluate resized to 1M x 1M
    "image-size-not-int": meta_for(image_size="96"),
    "image-size-negative": meta_for(image_size=-96),
    "too-many-classes": meta_for(class_names=[f"c{i}" for i in range(5000)]),
    "class-names-not-strings": meta_for(class_names=[1, 2]),
    "class-names-empty": meta_for(class_names=[]),
    "unknown-preset": meta_for(preset="../../evil"),
    "phase-3": meta_for(phase=3),
    "critical-out-of-range": meta_for(critical_classes=[99]),
    "composite-weights-nan": meta_for(composite_weights={"map": float("nan")}),
    "tau-nan": meta_for(phase=2, text_shape=[6, 8], tau_init=float("nan")),
    "normalize-unknown": meta_for(normalize="inception"),
    # A checkpoint whose config has data.normalize was written after the key: it lost it.
    "normalize-missing": meta_for(config={"data": {"normalize": "clip"}}),
}


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    """Real weights of the tiny preset for NAMES: only the meta is hostile, so a refusal is
    the meta check's, not a mismatch found after the model was built."""
    from defectfusion.model.models import build_model

    return build_model(TINY, NAMES).state_dict()


@pytest.mark.parametrize("case", sorted(HOSTILE_META))
def test_checkpoint_meta_is_checked_before_anything_is_allocated(
    case: str, tiny_state: dict, tmp_path: Path
) -> None:
    meta = HOSTILE_META[case]
    state = dict(tiny_state)
    if isinstance(meta, dict) and meta.get("phase") == 2:  # a Phase 2 model's fusion weights
        state |= {
            "fusion.text": torch.zeros(6, 8),
            "fusion.proj.weight": torch.zeros(8, 64),
            "fusion.proj.bias": torch.zeros(8),
            "fusion.log_tau": torch.tensor(0.0),
            "fusion.alpha": torch.tensor(0.0),
        }
    path = save_checkpoint(tmp_path / "c.pt", state, meta)
    with pytest.raises(UserError) as e:
        load_detector(path)
    assert str(path) in one_line(e)


def test_class_heads_that_do_not_match_the_meta_are_refused(tmp_path: Path) -> None:
    state = {"model.enc_score_head.weight": torch.zeros(3, 64)}
    path = save_checkpoint(tmp_path / "c.pt", state, meta_for())
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert "enc_score_head" in one_line(e) and "6 classes" in one_line(e)


def test_weights_of_the_wrong_shape_are_one_line(tmp_path: Path) -> None:
    from defectfusion.model.models import build_model

    model = build_model(TINY, NAMES)
    state = model.state_dict()
    key = "model.decoder.dec_bbox_head.0.layers.0.weight"
    key = key if key in state else next(k for k in state if k.endswith(".weight"))
    state[key] = torch.zeros(3, 3)
    with pytest.raises(UserError) as e:
        load_model_state(model, state, "c.pt")
    assert "c.pt" in one_line(e) and "do not fit" in one_line(e)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(value: float, tmp_path: Path) -> None:
    path = save_checkpoint(
        tmp_path / "c.pt", {"a": torch.zeros(3), "b": torch.tensor([1.0, value])}, meta_for()
    )
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert "NaN or infinite" in one_line(e) and "'b'" not in one_line(e)


def test_evaluate_refuses_a_checkpoint_with_nan_weights(
    tiny_state: dict, tiny_data: Path, tmp_path: Path, capsys
) -> None:
    """The catalogue's case: NaN weights were evaluated to mAP 0 with exit 0."""
    state = {k: v.clone() for k, v in tiny_state.items()}
    state["model.enc_score_head.weight"][0, 0] = float("nan")
    ckpt = save_checkpoint(tmp_path / "nan.pt", state, meta_for())
    code, err = run_cli(
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
    assert_exit_2_one_line(code, err)
    assert "NaN" in err and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage-header"])
def test_corrupt_safetensors_weights_are_one_line(damage: str, tmp_path: Path) -> None:
    from defectfusion.model.models import build_model

    folder = tmp_path / "weights"
    build_model(TINY, ["a", "b"]).save_pretrained(folder)
    st = folder / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:64])
    with pytest.raises(UserError) as e:
        build_model(TINY, ["a", "b"], init="detector", weights=str(folder))
    assert str(folder) in one_line(e)


# ---- hostile YAML, JSON and images ---------------------------------------------------------


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """'Billion laughs' in YAML: each level lists the previous one `width` times (9^9 leaves)."""
    lines = ["pipeline:", "  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    with pytest.raises(UserError) as e:
        load_config([bomb])
    assert str(bomb) in one_line(e) and "alias" in one_line(e)
    with pytest.raises(UserError, match="alias"):
        load_config(overrides=["figure_style.x=" + alias_bomb_flow()])


def alias_bomb_flow(levels: int = 7) -> str:
    """The same bomb in one flow-style `--set` value."""
    out = "&a0 [x, x, x, x, x, x, x, x, x, x]"
    for i in range(1, levels):
        out = f"[{out}, &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]]"
    return out


def test_a_few_yaml_aliases_are_still_fine(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pipeline:\n  a: &w {x: 1}\n  b: *w\n")
    assert read_yaml(cfg)["pipeline"]["b"] == {"x": 1}


def png_bomb(path: Path, side: int = 20_000) -> Path:
    """A valid 1-bit PNG of side x side pixels (400 Mpx, ~60 kB on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    comp = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)
    idat = b"".join(comp.compress(row * 500) for _ in range(side // 500)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def one_image_split(root: Path, name: str, w: int, h: int, boxes: list | None = None) -> Path:
    anns = [
        {"id": i + 1, "image_id": 1, "category_id": 0, "bbox": b, "area": 1.0, "iscrowd": 0}
        for i, b in enumerate(boxes if boxes is not None else [[1, 1, 5, 5]])
    ]
    data = coco.make_coco(
        [{"id": 1, "file_name": name, "width": w, "height": h}], anns, ["a"], {"split": "val"}
    )
    path = coco.split_path(root, "val")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path, capsys) -> None:
    (tmp_path / "images").mkdir()
    png_bomb(tmp_path / "images" / "bomb.png")
    split = one_image_split(tmp_path, "bomb.png", 20_000, 20_000)
    ds = CocoDetection(split, 64, train=False)
    with pytest.raises(UserError) as e:
        ds[0]
    assert "bomb.png" in one_line(e) and "Mpx" in one_line(e)
    report = validate_path(tmp_path)
    assert not report.ok and any("Mpx" in err for err in report.errors)


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_is_one_line(depth: int, tmp_path: Path, capsys) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * depth + "]" * depth)
    with pytest.raises(UserError) as e:
        coco.load_json(deep)
    assert "nested" in one_line(e)
    wrapped = tmp_path / "wrapped.json"  # deep inside an otherwise plausible COCO file
    wrapped.write_text(
        '{"images": [], "annotations": [], "categories": ' + "[" * depth + "]" * depth + "}"
    )
    code, err = run_cli(["data", "validate", str(wrapped)], capsys)
    assert code == 1 and "Traceback" not in capsys.readouterr().out + err


def test_ordinary_json_depth_is_fine(tmp_path: Path) -> None:
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"a": [[{"b": [1, 2]}]] * 3}))
    assert coco.load_json(ok)["a"][0][0]["b"] == [1, 2]


def test_16_bit_images_are_scaled_not_clipped_to_white(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    grey16 = np.full((32, 32), 32768, np.uint16)  # mid-grey in 16 bits
    grey16[:, :16] = 0
    Image.fromarray(grey16).save(tmp_path / "images" / "g.png")
    assert Image.open(tmp_path / "images" / "g.png").mode.startswith("I")
    split = one_image_split(tmp_path, "g.png", 32, 32)
    image = CocoDetection(split, 64, train=False).load_image(0)
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert image[:, :, :16].max() == 0 and image[:, :, 16:].min() == 128


# ---- data checked where it is used (training and evaluation read through CocoDetection) ----


BAD_BOXES = {
    "outside": [[50, 50, 20, 20]],
    "zero-width": [[1, 1, 0, 5]],
    "negative-height": [[1, 1, 5, -3]],
    "nan": [[float("nan"), 1, 5, 5]],
    "infinite": [[1, 1, float("inf"), 5]],
    "three-numbers": [[1, 1, 5]],
    "strings": [["1", "1", "5", "5"]],
}


@pytest.mark.parametrize("case", sorted(BAD_BOXES))
def test_loader_refuses_boxes_the_validator_rejects(case: str, tmp_path: Path) -> None:
    split = one_image_split(tmp_path, "x.png", 32, 32, BAD_BOXES[case])
    assert not validate_path(split, check_images=False).ok  # the validator rejects it too
    with pytest.raises(UserError) as e:
        CocoDetection(split, 64, train=False)
    assert str(split) in one_line(e) and "bbox" in one_line(e)


def _mutate(split: Path, change) -> Path:
    data = json.loads(split.read_text())
    change(data)
    split.write_text(json.dumps(data))
    return split


RECORD_FAULTS = {
    "path-escapes-dataset": lambda d: d["images"][0].update(file_name="../../secret.png"),
    "absolute-path": lambda d: d["images"][0].update(file_name="/etc/passwd"),
    "nul-in-path": lambda d: d["images"][0].update(file_name="a\0b.png"),
    "image-id-string": lambda d: d["images"][0].update(id="1"),
    "image-id-float": lambda d: (d["images"][0].update(id=1.5), d["annotations"].clear()),
    "annotation-id-bool": lambda d: d["annotations"][0].update(id=True),
    "image-id-list": lambda d: d["annotations"][0].update(image_id=[1]),
    "category-id-string": lambda d: d["annotations"][0].update(category_id="0"),
    "no-images": lambda d: (d["images"].clear(), d["annotations"].clear()),
    "width-zero": lambda d: d["images"][0].update(width=0),
    "categories-not-contiguous": lambda d: d["categories"][0].update(id=4),
    "images-not-a-list": lambda d: d.update(images={"1": "x.png"}),
    "record-not-an-object": lambda d: d["annotations"].append(7),
}


@pytest.mark.parametrize("case", sorted(RECORD_FAULTS))
def test_loader_refuses_malformed_records_in_one_line(case: str, tmp_path: Path) -> None:
    split = _mutate(one_image_split(tmp_path, "x.png", 32, 32), RECORD_FAULTS[case])
    with pytest.raises(UserError) as e:
        CocoDetection(split, 64, train=False)
    assert str(split) in one_line(e)


# ---- config ranges ------------------------------------------------------------------------

BAD_SETTINGS = [
    "phase1.lr=abc",
    "phase1.lr=-0.001",
    "phase1.lr=0",
    "phase1.lr=.nan",
    "phase1.lr=.inf",
    "phase2.lr=-1",
    "phase1.batch_size=0",
    "phase1.batch_size=-4",
    "phase1.epochs=-1",
    "phase1.epochs=0",
    "phase1.eval_every=0",
    "phase1.weight_decay=-1",
    "phase1.ema_decay=1.5",
    "data.num_workers=-1",
    "data.augment.scale_jitter=5",
    "data.augment.scale_jitter=[1.0]",
    "data.augment.scale_jitter=[2.0, 1.0]",
    "data.augment.scale_jitter=[0, 1.0]",
    "data.augment.scale_jitter=[.nan, 1.0]",
    "data.augment.hflip=2",
    "data.critical_classes=[]",
    "data.critical_classes=[-1]",
    "eval.batch_size=0",
    "eval.iou_match=0",
    "seed=-1",
    "phase1.lr=[",
    "phase1.lr={a: ",
    "=3",
    "phase1..lr=3",
]


@pytest.mark.parametrize("setting", BAD_SETTINGS)
def test_out_of_range_config_values_are_one_line(setting: str) -> None:
    with pytest.raises(UserError) as e:
        load_config(overrides=[setting])
    key = setting.split("=", 1)[0]
    assert key in one_line(e) or "--set" in one_line(e)


def test_critical_classes_must_be_classes_of_the_dataset() -> None:
    from defectfusion.config import check_classes

    cfg = load_config(overrides=["data.critical_classes=[1, 5]"])
    with pytest.raises(UserError) as e:
        check_classes(cfg, ["a", "b", "c"], "params.yaml")
    assert "[5]" in one_line(e) and "0..2" in one_line(e)
    check_classes(cfg, NAMES, "params.yaml")  # six classes: fine


@pytest.mark.parametrize(
    "content", [b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", b"\xff\xfe\x00a\x00b", b"seed: 1\0"]
)
def test_a_binary_config_file_is_one_line(content: bytes, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "params.yaml"
    cfg.write_bytes(content)
    code, err = run_cli(
        ["data", "prepare", "--config", str(cfg), "--out", str(tmp_path / "o")], capsys
    )
    assert_exit_2_one_line(code, err)
    assert str(cfg) in err and not (tmp_path / "o").exists()


# ---- OS errors: read-only or full disks, permissions ---------------------------------------


@pytest.mark.parametrize("code_", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_write_errors_name_the_file_and_the_fix(
    code_: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(a, b):
        raise OSError(code_, os.strerror(code_), str(a))

    monkeypatch.setattr(os, "replace", refuse)
    target = tmp_path / "metrics.json"
    with pytest.raises(UserError) as e:
        fsutil.atomic_write_json(target, {"a": 1})
    msg = one_line(e)
    assert msg.startswith(f"{target}: ") and (
        "space" in msg or "writable" in msg or "permission" in msg or "quota" in msg
    )
    assert list(tmp_path.iterdir()) == []  # no temporary left


@pytest.mark.parametrize("where", ["rename", "flush"])
def test_synth_on_a_full_disk_exits_2_in_one_line(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A full disk fails the rename of a JSON, or the flush of an image (no file name then)."""

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace" if where == "rename" else "fsync", full)
    out = tmp_path / "ds"
    code, err = run_cli(
        [
            "data",
            "synth",
            "--out",
            str(out),
            "--n-train",
            "2",
            "--n-val",
            "1",
            "--n-test",
            "1",
            "--image-size",
            "64",
        ],
        capsys,
    )
    assert_exit_2_one_line(code, err)
    assert "no space left" in err and f"{out}" in err and not out.exists()
    assert list(tmp_path.iterdir()) == []  # the staging folder is gone too


def test_an_imported_dataset_gets_ordinary_permissions(tmp_path: Path) -> None:
    """The staging folder (mkdtemp: 0700) becomes the dataset: others must be able to read it."""
    images, ann = coco_source(tmp_path / "src")
    umask = os.umask(0o022)
    try:
        import_coco(images, [ann], tmp_path / "ds")
        generate(tmp_path / "synth", SMALL)
    finally:
        os.umask(umask)
    assert (tmp_path / "ds").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "synth").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize(
    "exc",
    [
        PermissionError(errno.EACCES, "Permission denied", "/data/x.json"),
        OSError(errno.EROFS, "Read-only file system", "/data/x.json"),
        OSError(errno.EMFILE, "Too many open files"),
    ],
)
def test_cli_turns_os_errors_into_one_line(
    exc: OSError, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import defectfusion.data.validate as validate

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(validate, "validate_path", boom)
    code, err = run_cli(["data", "validate", str(tmp_path)], capsys)
    assert_exit_2_one_line(code, err)
    if exc.filename:
        assert exc.filename in err
