"""Phase 2's cache of the frozen detector's work.

Phase 2 trains the fusion, the encoder score head (``enc_score_head``) and the decoder's
class heads; the backbone and the hybrid encoder are frozen and in eval mode, so their
output is a fixed function of the input image. It is computed once per image and view,
stored on disk, and every Phase 2 run that starts from the same Phase 1 checkpoint with
the same preprocessing (variants, seeds) trains and validates from it.

Where the cut is: after ``model.model.encoder`` (the multi-scale ``feature_maps``). What
follows runs live: ``decoder_input_proj``, ``enc_output``, then ``enc_score_head``, which is
trainable and picks the top-k queries, and the decoder, whose queries depend on that pick
and on the random denoising queries. transformers' ``Deimv2Model.forward`` ignores its
``encoder_outputs`` argument, but it takes ``inputs_embeds`` in place of the backbone's
output and hands it to ``self.encoder``. `install` therefore routes a 3-D "pixel_values"
(the packed features ``[B, N, C]``; real images are 4-D) to ``inputs_embeds`` and lets the
encoder unpack it instead of running. Nothing in the model's state dict changes, so the
checkpoints the engine saves are ordinary Phase 2 checkpoints.

An entry is one safetensors file ``<cache_dir>/<weights sha256[:16]>/<key[:2]>/<key>.safetensors``
holding the packed features ``[N, C]`` and the view's boxes and labels. The key is the
sha256 of everything that decides the content: the Phase 1 checkpoint's frozen weights
(`frozen_weights_sha256`), the image's
bytes and annotations, the view (none, or pool seed + view index + augmentation settings),
the input size and normalisation (``data.normalize``'s mean and std: each of imagenet, clip,
siglip and none keys its own entries; a Phase 2 variant at another input size or normalisation
than Phase 1's builds its own), the storage dtype, autocast, the device type and the code
version (this module's and the loader's source, torch/torchvision/transformers versions).
Change any of them and the key changes: the old entry is never read. Writes are atomic
(stage, then rename), and a build holds an exclusive lock on its cache folder
(`build_lock`): a second job that starts building the same entries (two variants run side by
side from one Phase 1 checkpoint) waits, then finds them built and reuses them instead of
computing them again. The header holds the key and a sha256 of the data, so a truncated or
corrupted entry is detected on read and rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import struct
import types
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from defectfusion.core.errors import UserError
from defectfusion.core.fsutil import atomic_write_bytes, sha256_file

FORMAT = "defectfusion-phase2-cache-v1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

Target = dict[str, Any]


# ---- keys ------------------------------------------------------------------------------




def code_version() -> str:
    """What decides the features besides the inputs: this code, the loader, the libraries."""
    import torchvision
    import transformers

    from defectfusion.data import loader  # deferred: loads PIL

    h = hashlib.sha256(FORMAT.encode())
    for module_file in (__file__, loader.__file__):
        h.update(Path(module_file).read_bytes())
    for v in (torch.__version__, torchvision.__version__, transformers.__version__):
        h.update(v.encode())
    return h.hexdigest()[:16]


FROZEN_PREFIXES = ("model.conv_encoder.", "model.encoder.")


def frozen_weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 of the frozen part's weights and buffers (backbone + hybrid encoder) in a
    detector state dict: what the features depend on. Not the checkpoint file's bytes,
    which also hold metadata, the trainable heads and the optimiser: Phase 1's ``best.pt``
    and ``best_raw.pt`` share their entries when their frozen weights are equal."""
    h = hashlib.sha256()
    for name in sorted(k for k in state if k.startswith(FROZEN_PREFIXES)):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class CacheSpec:
    """The part of an entry's key that one build shares (all but the image and the view)."""

    root: Path  # <cache_dir>/<weights sha256[:16]>
    weights_sha256: str  # frozen_weights_sha256 of the Phase 1 checkpoint
    image_size: int  # Phase 2's data.image_size (a variant's, not Phase 1's)
    mean: tuple[float, ...]  # data.normalize's constants (loader.NORMALIZATIONS)
    std: tuple[float, ...]
    dtype: str  # storage dtype (DTYPES)
    autocast: str  # "none" | "bf16": the precision the frozen part ran in
    device: str  # "cpu" | "cuda": rounding differs between them
    code: str

    def key(self, image_sha256: str, annotations: list[list[float]], view: dict | None) -> str:
        ident = {**asdict(self), "root": None, "image": image_sha256, "anns": annotations}
        ident["view"] = view
        blob = json.dumps(ident, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"


def make_spec(
    cache_dir: str | Path,
    weights_sha256: str,
    dataset: Any,
    dtype: str,
    autocast: bool,
    device: torch.device,
) -> CacheSpec:
    if dtype not in DTYPES:
        raise UserError(f"phase2.cache_dtype={dtype!r} must be one of {sorted(DTYPES)}")
    return CacheSpec(
        root=Path(cache_dir) / weights_sha256[:16],
        weights_sha256=weights_sha256,
        image_size=int(dataset.image_size),
        mean=tuple(float(m) for m in dataset.mean),
        std=tuple(float(s) for s in dataset.std),
        dtype=dtype,
        autocast="bf16" if autocast else "none",
        device=device.type,
        code=code_version(),
    )


# ---- entries ---------------------------------------------------------------------------


def pack(maps: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Feature maps ``[B,C,H_l,W_l]`` -> ``[B, sum(H_l W_l), C]`` and the ``(H_l, W_l)``."""
    shapes = [(int(m.shape[-2]), int(m.shape[-1])) for m in maps]
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1), shapes


def unpack(packed: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The inverse of `pack` (exact: only copies)."""
    b, _, c = packed.shape
    parts = packed.split([h * w for h, w in shapes], dim=1)
    return [
        p.transpose(1, 2).reshape(b, c, h, w).contiguous()
        for p, (h, w) in zip(parts, shapes, strict=True)
    ]


def encode_entry(key: str, tensors: dict[str, torch.Tensor], shapes: list) -> bytes:
    """safetensors bytes; the header's metadata holds the key and a sha256 of the data."""
    from safetensors.torch import save

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    plain = save(tensors)
    data = plain[8 + struct.unpack("<Q", plain[:8])[0] :]
    meta = {
        "format": FORMAT,
        "key": key,
        "shapes": json.dumps(shapes),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return save(tensors, metadata=meta)


def decode_entry(raw: bytes, key: str) -> tuple[dict[str, torch.Tensor], list] | None:
    """Tensors and shapes of an entry, or None when it is not a whole, matching entry."""
    from safetensors.torch import load

    try:
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        meta = header.get("__metadata__") or {}
        data = raw[8 + n :]
        if meta.get("format") != FORMAT or meta.get("key") != key:
            return None
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return None
        return load(raw), [tuple(s) for s in json.loads(meta["shapes"])]
    except Exception:  # noqa: BLE001 - any unreadable entry is rebuilt, never trusted
        return None


def read_entry(path: Path, key: str) -> tuple[dict[str, torch.Tensor], list] | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    return decode_entry(raw, key)


# ---- building --------------------------------------------------------------------------


@contextlib.contextmanager
def build_lock(root: Path, progress: Callable[[str], None] | None = None) -> Iterator[None]:
    """An exclusive lock on a cache folder while its entries are checked and built.

    Not for correctness (entries are written atomically and verified on read) but for the
    CPU: jobs that start together from one Phase 1 checkpoint would otherwise each compute
    every entry. The lock is the kernel's (flock): it goes with the process, so a killed
    build never leaves a stale lock behind.
    """
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                progress(f"Phase 2 cache: {root} is being built by another job; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def engine_numerics(device: torch.device) -> Iterator[None]:
    """The CPU settings the training engine runs under (denormals flushed, deterministic
    kernels): the cached features must be the bits the live forward computes there."""
    if device.type != "cpu":
        yield
        return
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.use_deterministic_algorithms(det, warn_only=True)


def frozen_features(model: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The frozen part's output: backbone (``conv_encoder``) then hybrid encoder."""
    base = model.model
    return base.encoder(base.conv_encoder(pixel_values)).feature_maps


@dataclass
class Item:
    """One cached sample: dataset index, view (None: the plain image) and its key."""

    index: int
    view: int | None
    key: str


class CachedSplit(Dataset):
    """A split's cached features; items are ``(features [N,C] float32, target)``.

    Indexed like `CocoDetection`: ``(i, sample_seed)`` picks view ``sample_seed % views``
    of image i (the loader's view pool), a plain ``i`` the un-augmented image.
    """

    def __init__(self, dataset: Any, spec: CacheSpec, views: int) -> None:
        self.dataset, self.spec, self.views = dataset, spec, views
        self.shapes: list[tuple[int, int]] | None = None
        self.items: dict[tuple[int, int | None], Item] = {}
        for i in range(len(dataset)):
            rec = dataset.images[i]
            image_sha = sha256_file(dataset.root / rec["file_name"])
            boxes, labels = dataset.raw_target(i)
            anns = [[*b, float(c)] for b, c in zip(boxes.tolist(), labels.tolist(), strict=True)]
            for v in range(views) if views > 0 else [None]:
                view = None
                if v is not None:
                    view = {"pool_seed": dataset.view_seed, "index": v}
                    view["augment"] = asdict(dataset.augment)
                self.items[(i, v)] = Item(i, v, spec.key(image_sha, anns, view))

    def __len__(self) -> int:
        return len(self.dataset)

    def _view(self, index: int | tuple[int, int]) -> tuple[int, int | None]:
        if isinstance(index, tuple):
            i, seed = index
            return (i, seed % self.views) if self.views > 0 else (i, None)
        return index, (None if self.views == 0 else 0)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, Target]:
        i, v = self._view(index)
        item = self.items[(i, v)]
        path = self.spec.path(item.key)
        entry = read_entry(path, item.key)
        if entry is None:
            raise UserError(
                f"{path}: Phase 2 cache entry missing or corrupt during the run; "
                "run again to rebuild it"
            )
        tensors, _ = entry
        rec = self.dataset.images[i]
        target: Target = {
            "class_labels": tensors["labels"],
            "boxes": tensors["boxes"],
            "image_id": self.dataset.image_ids[i],
            "orig_size": (int(rec["height"]), int(rec["width"])),
        }
        return tensors["features"].float(), target

    def build(
        self,
        model: nn.Module,
        device: torch.device,
        batch_size: int = 16,
        autocast: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> dict[str, int]:
        """Check every entry; compute the missing and corrupt ones. Returns the counts."""
        with build_lock(self.spec.root, progress):
            return self._build(model, device, batch_size, autocast, progress)

    def _build(
        self,
        model: nn.Module,
        device: torch.device,
        batch_size: int,
        autocast: bool,
        progress: Callable[[str], None] | None,
    ) -> dict[str, int]:
        todo: list[Item] = []
        counts = {"entries": len(self.items), "reused": 0, "built": 0, "corrupt": 0}
        for item in self.items.values():
            path = self.spec.path(item.key)
            entry = read_entry(path, item.key) if path.exists() else None
            if entry is None:
                todo.append(item)
                counts["corrupt"] += int(path.exists())
            else:
                counts["reused"] += 1
                self.shapes = self.shapes or entry[1]
        if not todo:
            return counts
        if progress:
            progress(f"Phase 2 cache: computing {len(todo)} of {len(self.items)} entries")
        base = model.model
        modes = {m: m.training for m in (base.conv_encoder, base.encoder)}
        dtype = DTYPES[self.spec.dtype]
        try:
            base.conv_encoder.eval()
            base.encoder.eval()
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                samples = [self._sample(it) for it in chunk]
                pixels = torch.stack([x for x, _ in samples])
                if len(chunk) == 1:
                    # CPU kernels take another path for a batch of one (the last bits
                    # differ); training batches are never single, so compute it in a pair.
                    pixels = torch.cat([pixels, pixels])
                with torch.no_grad(), engine_numerics(device):
                    ctx = (
                        torch.autocast(device.type, dtype=torch.bfloat16)
                        if autocast
                        else contextlib.nullcontext()
                    )
                    with ctx:
                        maps = frozen_features(model, pixels.to(device))
                packed, shapes = pack(maps)
                self.shapes = shapes
                for j, (it, (_, target)) in enumerate(zip(chunk, samples, strict=True)):
                    tensors = {
                        "features": packed[j].to("cpu", dtype),
                        "boxes": target["boxes"].to(torch.float32),
                        "labels": target["class_labels"].to(torch.int64),
                    }
                    raw = encode_entry(it.key, tensors, shapes)
                    atomic_write_bytes(self.spec.path(it.key), raw)
                    counts["built"] += 1
        finally:
            for m, training in modes.items():
                m.train(training)
        return counts

    def _sample(self, item: Item) -> tuple[torch.Tensor, Target]:
        if item.view is None:
            return self.dataset._item(item.index)
        return self.dataset[(item.index, item.view)]  # view v: sample seed v (v % views == v)


# ---- using it ----------------------------------------------------------------------------


def _route_features(
    module: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook: a 3-D ``pixel_values`` is packed features -> ``inputs_embeds``."""
    pv = kwargs.get("pixel_values", args[0] if args else None)
    if not (isinstance(pv, torch.Tensor) and pv.ndim == 3):
        return None
    kwargs = {**kwargs, "pixel_values": None, "inputs_embeds": pv}
    return (), kwargs


def _cached_encoder_forward(self: nn.Module, inputs_embeds: Any = None, **kwargs: Any) -> Any:
    """The hybrid encoder, or the unpacking of features it computed earlier."""
    if isinstance(inputs_embeds, torch.Tensor) and inputs_embeds.ndim == 3:
        from transformers.models.deimv2.modeling_deimv2 import Deimv2EncoderOutput

        return Deimv2EncoderOutput(feature_maps=unpack(inputs_embeds, self._cache_shapes))
    return type(self).forward(self, inputs_embeds, **kwargs)


def install(model: nn.Module, shapes: list[tuple[int, int]]) -> None:
    """Let `model` take packed cached features ``[B,N,C]`` wherever it takes images.

    Images (4-D) still run the whole detector. The state dict does not change.
    """
    if getattr(model, "_cache_installed", False):
        model.model.encoder._cache_shapes = list(shapes)
        return
    encoder = model.model.encoder
    encoder._cache_shapes = list(shapes)
    # An instance attribute, not a subclass: the weights and their keys stay as they are.
    encoder.forward = types.MethodType(_cached_encoder_forward, encoder)
    model.register_forward_pre_hook(_route_features, with_kwargs=True)
    model._cache_installed = True


def make_cached_loader(
    split: CachedSplit, batch_size: int, train: bool, seed: int = 0
) -> DataLoader:
    """The loader of `make_loader`, over cached features: same sampler, same batches."""
    from defectfusion.data.loader import SeededSampler, collate  # deferred: loads PIL

    drop_last = train and len(split) >= batch_size
    sampler = SeededSampler(
        len(split), shuffle=train, generator=torch.Generator().manual_seed(seed)
    )
    return DataLoader(
        split,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
    )


# ---- Phase 2's inputs ---------------------------------------------------------------------


@dataclass
class Phase2Inputs:
    """What Phase 2 hands the engine: its train loader, its val batches, log lines."""

    train_loader: Callable[[int], DataLoader]  # per-process batch -> loader
    val_loader: DataLoader | None  # None: the val images (make_evaluator's own loader)
    notes: list[str]
    cached: bool


def uncached_reason(cfg: Any) -> str | None:
    """Why Phase 2 must run the frozen part live, or None when it may be cached."""
    if not cfg.phase2.cache:
        return "phase2.cache is false"
    if cfg.fusion.bn == "train":
        return (
            "fusion.bn=train: the frozen modules' BatchNorm statistics move, so their output "
            "is not a fixed function of the image"
        )
    if cfg.phase2.cache_views < 0:
        return "phase2.cache_views=-1: fresh augmentations every epoch"
    return None


def phase2_inputs(
    cfg: Any,
    model: nn.Module,
    train_json: Path,
    val_json: Path,
    progress: Callable[[str], None] | None = print,
) -> Phase2Inputs:
    """Build (or reuse) the cache and return loaders that read it; or, when the frozen part
    cannot be cached (`uncached_reason`), the live train loader, with the same views."""
    from defectfusion.data.loader import (  # deferred: loads PIL
        AugmentConfig,
        CocoDetection,
        make_loader,
        normalization,
    )

    tc = cfg.phase2
    views = tc.cache_views
    augment = AugmentConfig.from_config(cfg.data.augment)
    reason = uncached_reason(cfg)
    if reason is not None:
        pool = None if views < 0 else views

        def live_loader(batch: int) -> DataLoader:
            return make_loader(
                train_json, cfg.data.image_size, batch, train=True, augment=augment,
                num_workers=cfg.data.num_workers, seed=cfg.seed,
                normalize=cfg.data.normalize, views=pool, view_seed=tc.view_seed,
            )  # fmt: skip

        return Phase2Inputs(
            train_loader=live_loader,
            val_loader=None,
            notes=[f"Phase 2 cache: off, the frozen backbone and encoder run live ({reason})"],
            cached=False,
        )

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    mean, std = normalization(cfg.data.normalize)
    size = cfg.data.image_size
    train_ds = CocoDetection(
        train_json, size, True, augment, mean, std, views=views, view_seed=tc.view_seed
    )
    val_ds = CocoDetection(val_json, size, False, mean=mean, std=std)
    model.to(device)
    # Training forwards run under bf16 autocast on CUDA when amp is on (the engine's
    # Accelerator); predictions never do. Each split is cached as its live forward computes it.
    weights = frozen_weights_sha256(model.state_dict())
    train_spec = make_spec(tc.cache_dir, weights, train_ds, tc.cache_dtype, cuda and tc.amp, device)
    val_spec = make_spec(tc.cache_dir, weights, val_ds, tc.cache_dtype, False, device)
    train_split = CachedSplit(train_ds, train_spec, views)
    val_split = CachedSplit(val_ds, val_spec, 0)
    bs = cfg.eval.batch_size
    c_train = train_split.build(model, device, bs, cuda and tc.amp, progress)
    c_val = val_split.build(model, device, bs, False, progress)
    shapes = train_split.shapes or val_split.shapes
    assert shapes is not None
    install(model, shapes)

    val_loader = make_cached_loader(val_split, bs, train=False)

    def train_loader(batch: int) -> DataLoader:
        return make_cached_loader(train_split, batch, train=True, seed=cfg.seed)

    def fmt(c: dict[str, int]) -> str:
        return f"{c['reused']} reused, {c['built']} built, {c['corrupt']} corrupt rebuilt"

    pool = f"{views} views per image (view_seed {tc.view_seed})" if views else "no augmentation"
    note = (
        f"Phase 2 cache: on, {train_spec.root} ({tc.cache_dtype}); train {pool}: "
        f"{fmt(c_train)}; val: {fmt(c_val)}"
    )
    return Phase2Inputs(train_loader, val_loader, [note], cached=True)
