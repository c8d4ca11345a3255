"""Phase 2's cache of the frozen backbone + encoder (defectfusion.model.cache): cached and live runs
are the same run, the key covers what decides an entry, and a damaged entry is rebuilt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from common import NAMES
from conftest import TINY_SIZE, tiny_overrides
from defectfusion.config import load_config
from defectfusion.core.errors import UserError
from defectfusion.data.loader import CocoDetection, make_loader, view_seed
from defectfusion.model import cache as C


def phase2_cfg(tiny_data: Path, cache_dir: Path, **extra: object):
    values = {
        "phase2.epochs": 2,
        "phase2.batch_size": 4,
        "phase2.patience": 0,
        "phase2.lr": 0.01,  # large enough that two epochs move the heads
        "phase2.cache_dir": str(cache_dir),
        "phase2.cache_views": 2,
        "text.encoder": "random",
        **extra,
    }
    return load_config(
        overrides=tiny_overrides(tiny_data, 2) + [f"{k}={v}" for k, v in values.items()]
    )


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(cfg, phase1: Path, out: Path) -> tuple[list[dict], list[dict], str]:
    from defectfusion.train.phase2 import train_phase2

    train_phase2(cfg, phase1, out)
    log = (out / "experiment_log.txt").read_text()
    return rows(out / "steps.jsonl"), rows(out / "history.jsonl"), log


def val_rows(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k.startswith("val_")} for r in history]


# ---- cached and live Phase 2 are the same run ----------------------------------------------


@pytest.mark.parametrize("views", [2, 0])
def test_cached_and_live_phase2_give_identical_losses_and_metrics(
    tiny_data: Path, tiny_run: Path, tmp_path: Path, views: int
) -> None:
    phase1 = tiny_run / "best.pt"
    cache_dir = tmp_path / "cache"
    extra = {"phase2.cache_views": views}
    live_cfg = phase2_cfg(tiny_data, cache_dir, **extra, **{"phase2.cache": False})
    live_steps, live_hist, live_log = run(live_cfg, phase1, tmp_path / "live")
    steps, hist, log = run(phase2_cfg(tiny_data, cache_dir, **extra), phase1, tmp_path / "cached")
    assert "Phase 2 cache: off" in live_log and "Phase 2 cache: on" in log
    assert any(cache_dir.rglob("*.safetensors"))
    assert len(steps) == len(live_steps) > 0
    assert [r["loss"] for r in steps] == [r["loss"] for r in live_steps]
    assert [r["alpha"] for r in steps] == [r["alpha"] for r in live_steps]
    assert val_rows(hist) == val_rows(live_hist)
    # Not vacuous: training moved the loss and the metrics are real numbers.
    assert len({r["loss"] for r in steps}) > 1
    assert all(isinstance(r["val_map"], float) for r in hist)
    # Predictions: identical before training; after it, equal to the last printed digit. The
    # cached run feeds the decoder stored tensors instead of the live encoder's graph, so
    # autograd may add up a shared parameter's gradients in another order: an update can
    # differ in float32's last bit, which the 6-decimal JSON shows as +-1e-6 on a few of the
    # 400 scores (the losses and val metrics above stay bit-identical).
    def preds(run: str, name: str) -> list[dict]:
        return json.loads((tmp_path / run / f"{name}.predictions.json").read_text())

    assert preds("cached", "val_epoch0") == preds("live", "val_epoch0")
    # Two detections whose scores tie to the printed digit may swap places in the score
    # order (a +-1e-6 difference decides which comes first): pair them by box, not position.
    def by_box(ds: list[dict]) -> list[dict]:
        return sorted(
            ds, key=lambda d: (d["image_id"], d["category_id"], [round(x) for x in d["bbox"]])
        )

    for name in ("val_epoch1", "val_final"):
        ours, theirs = by_box(preds("cached", name)), by_box(preds("live", name))
        assert [(d["image_id"], d["category_id"]) for d in ours] == [
            (d["image_id"], d["category_id"]) for d in theirs
        ]
        for a, b in zip(ours, theirs, strict=True):
            assert abs(a["score"] - b["score"]) <= 2e-6, (name, a, b)
            assert max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"], strict=True)) <= 1e-3
    # A second run reuses every entry.
    _, _, log2 = run(phase2_cfg(tiny_data, cache_dir, **extra), phase1, tmp_path / "again")
    assert " 0 built" in log2 and "reused" in log2


def test_bn_train_runs_live_and_says_so(tiny_data: Path, tiny_run: Path, tmp_path: Path) -> None:
    cfg = phase2_cfg(tiny_data, tmp_path / "cache", **{"fusion.bn": "train", "phase2.epochs": 1})
    _, _, log = run(cfg, tiny_run / "best.pt", tmp_path / "out")
    assert "Phase 2 cache: off" in log and "fusion.bn=train" in log
    assert not any((tmp_path / "cache").rglob("*.safetensors"))


def test_views_do_not_depend_on_the_run_seed(tiny_data: Path) -> None:
    """The pool is drawn from view_seed, so runs with other seeds share it (and its cache)."""
    split = tiny_data / "annotations" / "train.json"
    ds = CocoDetection(split, TINY_SIZE, train=True, views=3, view_seed=0)
    a = ds[(1, 4)]  # sample seed 4 -> view 1
    b = ds[(1, 7)]  # sample seed 7 -> view 1 too
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    views = {tuple(ds[(1, s)][0].flatten()[:64].tolist()) for s in range(3)}
    assert len(views) > 1  # the views differ from each other
    other = CocoDetection(split, TINY_SIZE, train=True, views=3, view_seed=1)
    assert not torch.equal(other[(1, 4)][0], a[0])
    assert view_seed(0, 5, 1) == view_seed(0, 5, 1) != view_seed(0, 5, 2)
    plain = CocoDetection(split, TINY_SIZE, train=True, views=0)
    assert torch.equal(plain[(1, 123)][0], CocoDetection(split, TINY_SIZE, train=False)[1][0])
    loader = make_loader(split, TINY_SIZE, 4, train=True, views=2)
    assert loader.dataset.views == 2


# ---- keys and invalidation ---------------------------------------------------------------


def phase2_model(phase1: Path, normalize: str = "imagenet"):
    from defectfusion.train.phase2 import build_phase2_model

    cfg = load_config(overrides=[f"data.image_size={TINY_SIZE}", "text.encoder=random"])
    model, _ = build_phase2_model(cfg, phase1, NAMES)
    return model


def weights(phase1: Path) -> str:
    from defectfusion.model.checkpoint import load_checkpoint

    return C.frozen_weights_sha256(load_checkpoint(phase1)["model"])


def split(data: Path, phase1: Path, cache_dir: Path, views: int = 2, normalize: str = "imagenet"):
    from defectfusion.data.loader import normalization

    mean, std = normalization(normalize)
    ds = CocoDetection(
        data / "annotations" / "train.json", TINY_SIZE, True, mean=mean, std=std, views=views
    )
    spec = C.make_spec(cache_dir, weights(phase1), ds, "float32", False, torch.device("cpu"))
    return C.CachedSplit(ds, spec, views)


def build(s: C.CachedSplit, model) -> dict[str, int]:
    return s.build(model, torch.device("cpu"), batch_size=4)


@pytest.fixture(scope="module")
def model(tiny_run: Path):
    return phase2_model(tiny_run / "best.pt")


def test_entries_are_reused_and_match_the_live_encoder(
    tiny_data: Path, tiny_run: Path, tmp_path: Path, model
) -> None:
    s = split(tiny_data, tiny_run / "best.pt", tmp_path)
    n = len(s.items)
    assert n == 2 * len(s.dataset)
    assert build(s, model) == {"entries": n, "reused": 0, "built": n, "corrupt": 0}
    assert build(s, model) == {"entries": n, "reused": n, "built": 0, "corrupt": 0}
    # An entry is the frozen part's output for that view, bit for bit.
    x, target = s.dataset[(3, 1)]
    feats, cached_target = s[(3, 5)]  # sample seed 5 -> view 1
    model.eval()  # the frozen part always runs in eval mode (what fusion.bn=eval keeps)
    with torch.no_grad(), C.engine_numerics(torch.device("cpu")):
        live = C.frozen_features(model, torch.stack([x, s.dataset[(0, 0)][0]]))
    assert torch.equal(feats, C.pack(live)[0][0])
    assert torch.equal(cached_target["boxes"], target["boxes"])
    assert torch.equal(cached_target["class_labels"], target["class_labels"])
    assert C.unpack(C.pack(live)[0], s.shapes)[0].equal(live[0])


def test_another_phase1_checkpoint_invalidates(
    tiny_data: Path, tiny_run: Path, tmp_path: Path, model
) -> None:
    from defectfusion.model.checkpoint import load_checkpoint, save_checkpoint

    s = split(tiny_data, tiny_run / "best.pt", tmp_path)
    build(s, model)
    ckpt = load_checkpoint(tiny_run / "best.pt")
    state = dict(ckpt["model"])
    name = next(k for k in state if k.startswith("model.encoder.") and state[k].is_floating_point())
    state[name] = state[name] + 0.01
    other = tmp_path / "other.pt"
    save_checkpoint(other, state, ckpt["meta"])
    s2 = split(tiny_data, other, tmp_path)
    assert s2.spec.root != s.spec.root
    assert set(i.key for i in s2.items.values()).isdisjoint(i.key for i in s.items.values())
    counts = build(s2, phase2_model(other))
    assert counts["built"] == counts["entries"] and counts["reused"] == 0
    assert not torch.equal(s2[(0, 0)][0], s[(0, 0)][0])
    # Weights after the cut (a class head) do not decide the features: entries are kept.
    state = dict(ckpt["model"])
    head = next(k for k in state if "class_embed" in k)
    state[head] = state[head] + 0.01
    save_checkpoint(other, state, {**ckpt["meta"], "note": "other bytes"})
    assert split(tiny_data, other, tmp_path).items[(0, 0)].key == s.items[(0, 0)].key


def test_a_changed_image_invalidates_its_entries_only(
    tiny_data: Path, tiny_run: Path, tmp_path: Path, model
) -> None:
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    s = split(data, tiny_run / "best.pt", tmp_path / "cache")
    build(s, model)
    path = s.dataset.root / s.dataset.images[2]["file_name"]
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.putpixel((0, 0), (255, 0, 0) if im.getpixel((0, 0)) != (255, 0, 0) else (0, 0, 0))
        im.save(path)
    s2 = split(data, tiny_run / "best.pt", tmp_path / "cache")
    assert build(s2, model)["built"] == 2  # image 2's two views
    assert s2.items[(2, 0)].key != s.items[(2, 0)].key
    assert s2.items[(1, 0)].key == s.items[(1, 0)].key


@pytest.mark.parametrize(
    "change", ["normalize", "image_size", "views_augment", "dtype", "autocast", "code"]
)
def test_a_changed_preprocessing_setting_changes_the_key(
    tiny_data: Path, tiny_run: Path, tmp_path: Path, change: str
) -> None:
    phase1 = tiny_run / "best.pt"
    base = split(tiny_data, phase1, tmp_path)
    key = base.items[(0, 0)].key
    if change == "normalize":
        other = split(tiny_data, phase1, tmp_path, normalize="clip").items[(0, 0)].key
    elif change == "image_size":
        ds = CocoDetection(tiny_data / "annotations" / "train.json", 128, True, views=2)
        spec = C.make_spec(tmp_path, weights(phase1), ds, "float32", False, torch.device("cpu"))
        other = C.CachedSplit(ds, spec, 2).items[(0, 0)].key
    elif change == "views_augment":
        from defectfusion.data.loader import AugmentConfig

        ds = CocoDetection(
            tiny_data / "annotations" / "train.json", TINY_SIZE, True,
            AugmentConfig(hflip=0.0), views=2,
        )  # fmt: skip
        other = C.CachedSplit(ds, base.spec, 2).items[(0, 0)].key
    else:
        import dataclasses

        value = {"dtype": "float16", "autocast": "bf16", "code": "another"}[change]
        spec = dataclasses.replace(base.spec, **{change: value})
        other = C.CachedSplit(base.dataset, spec, 2).items[(0, 0)].key
    assert other != key
    # The plain view (no augmentation) is another entry than any augmented one.
    assert split(tiny_data, phase1, tmp_path, views=0).items[(0, None)].key != key


def test_each_normalisation_keys_its_own_entries(
    tiny_data: Path, tiny_run: Path, tmp_path: Path
) -> None:
    """imagenet, clip, siglip and none (the dose-response's variants) never share an entry;
    the same normalisation gives the same keys again."""
    phase1 = tiny_run / "best.pt"
    names = ["imagenet", "clip", "siglip", "none"]
    keys = {n: split(tiny_data, phase1, tmp_path, normalize=n).items[(0, 0)].key for n in names}
    assert len(set(keys.values())) == len(names)
    assert split(tiny_data, phase1, tmp_path, normalize="none").items[(0, 0)].key == keys["none"]


# ---- damaged entries -----------------------------------------------------------------------


def test_a_corrupt_or_truncated_entry_is_rebuilt(
    tiny_data: Path, tiny_run: Path, tmp_path: Path, model
) -> None:
    s = split(tiny_data, tiny_run / "best.pt", tmp_path)
    build(s, model)
    before = {iv: s[(iv[0], iv[1])][0].clone() for iv in [(0, 0), (1, 1), (2, 0)]}
    truncated = s.spec.path(s.items[(0, 0)].key)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    flipped = s.spec.path(s.items[(1, 1)].key)
    raw = bytearray(flipped.read_bytes())
    raw[-5] ^= 0x40  # one bit of the features
    flipped.write_bytes(bytes(raw))
    swapped = s.spec.path(s.items[(2, 0)].key)  # a whole entry, but another key's
    shutil.copy(s.spec.path(s.items[(3, 0)].key), swapped)
    for path, key in [(truncated, s.items[(0, 0)].key), (flipped, s.items[(1, 1)].key)]:
        assert C.read_entry(path, key) is None
    with pytest.raises(UserError, match="corrupt"):
        s[(0, 0)]  # read during a run: refused, never trusted
    counts = build(s, model)
    assert counts["corrupt"] == 3 and counts["built"] == 3
    for (i, v), feats in before.items():
        assert torch.equal(s[(i, v)][0], feats)


def test_half_precision_entries_round_to_the_float32_ones(
    tiny_data: Path, tiny_run: Path, tmp_path: Path, model
) -> None:
    import dataclasses

    s = split(tiny_data, tiny_run / "best.pt", tmp_path)
    build(s, model)
    half = C.CachedSplit(s.dataset, dataclasses.replace(s.spec, dtype="float16"), 2)
    build(half, model)
    full, h = s[(0, 0)][0], half[(0, 0)][0]
    assert h.dtype == torch.float32 and torch.equal(h, full.half().float())
    assert (
        half.spec.path(half.items[(0, 0)].key).stat().st_size
        < 0.6 * s.spec.path(s.items[(0, 0)].key).stat().st_size
    )


# ---- loader speed: grey images skip the colour jitter's no-ops ----------------------------


def test_grey_images_skip_saturation_and_hue_but_not_the_random_stream() -> None:
    from torchvision.transforms import v2

    from defectfusion.data.loader import GreyAwareColorJitter, is_grey

    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (1, 48, 48), dtype=torch.uint8, generator=g).expand(3, -1, -1)
    colour = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8, generator=g)
    assert is_grey(grey) and not is_grey(colour)
    ours = GreyAwareColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)
    theirs = v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)
    for seed in range(5):
        torch.manual_seed(seed)
        a = ours(colour)
        torch.manual_seed(seed)
        assert torch.equal(a, theirs(colour))  # colour images: unchanged behaviour
        torch.manual_seed(seed)
        out = ours(grey)
        after = torch.rand(1)
        torch.manual_seed(seed)
        theirs(grey)
        assert torch.equal(after, torch.rand(1))  # the same draws were consumed
        assert is_grey(out)
        # Only brightness and contrast acted: the same factors, in the same order.
        torch.manual_seed(seed)
        params = theirs.make_params([grey])
        ref = grey
        for fn in params["fn_idx"].tolist():
            if fn == 0:
                ref = v2.functional.adjust_brightness(ref, params["brightness_factor"])
            elif fn == 1:
                ref = v2.functional.adjust_contrast(ref, params["contrast_factor"])
        assert torch.equal(out, ref)


def test_a_second_build_waits_for_the_first(tmp_path: Path) -> None:
    """Two jobs building one cache folder: the second waits (and says so), then proceeds."""
    import threading

    from defectfusion.model.cache import build_lock

    said: list[str] = []
    entered = threading.Event()

    def second() -> None:
        with build_lock(tmp_path, said.append):
            entered.set()

    with build_lock(tmp_path):
        t = threading.Thread(target=second)
        t.start()
        assert not entered.wait(0.5)  # blocked while the first build holds the lock
        assert said and "being built by another job" in said[0]
    t.join(10)
    assert entered.is_set()
