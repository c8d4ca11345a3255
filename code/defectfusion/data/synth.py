"""The embedded default dataset: procedural metal surfaces with six defect classes.

It mimics the thesis's private taxonomy (see THESIS.md, "Task and data"): *normal* and
*perforation* are the easy majority classes; *fracture* (jagged, branching dark gap) and
*deep scratch* (dark, thick but smooth groove) are the hard pair; *contamination* is a
low-contrast stain or particle cluster; *dent* is a shaded depression.

Each image is a surface (brushed or blasted grey metal, lighting gradient, soft specular
highlight, sensor noise) with 1-5 non-overlapping objects. An object is a `Stamp`: a small
patch that multiplies the surface (and may flatten its texture, for machined faces); its
label box is the bounding box of the pixels the stamp visibly changes, so boxes are tight.

Every image draws from its own generator seeded by ``(seed, split, index)``: the same spec
gives byte-identical PNG and JSON files, whatever the order the images are made in.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from defectfusion.core.errors import UserError
from defectfusion.core.fsutil import staged_dir, swap_dir
from defectfusion.core.pool import spawn_pool
from defectfusion.data import coco

CLASS_NAMES: tuple[str, ...] = (
    "normal",
    "perforation",
    "fracture",
    "scratch",
    "dent",
    "contamination",
)
# Drawn per object; placement drops a few large objects, so the realised shares differ slightly.
CLASS_WEIGHTS: tuple[float, ...] = (0.27, 0.28, 0.10, 0.13, 0.12, 0.10)
OBJECTS_PER_IMAGE = (1, 2, 3, 4, 5)
OBJECTS_WEIGHTS = (0.15, 0.25, 0.25, 0.20, 0.15)
DEEP_SCRATCH_SHARE = 0.4  # scratches drawn as deep grooves: the ones confusable with fractures
MIN_IMAGE_SIZE = 64

# A stamp changes a pixel visibly where its gain is off 1, or its flattening above 0, by more
# than this; the label box covers exactly those pixels (fainter halos fall outside it).
VISIBLE = 0.06


@dataclass(frozen=True)
class SynthSpec:
    seed: int = 0
    n_train: int = 800
    n_val: int = 200
    n_test: int = 200
    image_size: int = 192


@dataclass
class Stamp:
    """A drawn object on a small patch, in the patch's pixel frame.

    The surface under the patch becomes ``lerp(surface, mean(surface), flat) * gain``.
    """

    gain: np.ndarray  # (h, w) or (h, w, 3): multiplies the surface
    flat: np.ndarray  # (h, w) in [0, 1]: how much the texture is replaced by its mean
    mask: np.ndarray  # (h, w) bool: the pixels the object visibly changes

    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the mask, exclusive ends, in patch pixels."""
        ys = np.flatnonzero(self.mask.any(axis=1))
        xs = np.flatnonzero(self.mask.any(axis=0))
        return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


@dataclass(frozen=True)
class Scene:
    """Per-image constants that all objects share, so lighting is consistent."""

    size: int
    light: np.ndarray  # unit 2-vector: direction the light comes from, in image (x, y)


# ---- small geometry helpers ---------------------------------------------------------------


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) of an h x w patch."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    return y + 0.5, x + 0.5


def _rot(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def _ellipse(
    y: np.ndarray, x: np.ndarray, cy: float, cx: float, a: float, b: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius (1 on the rim) and polar angle of each pixel for an ellipse."""
    c, s = np.cos(angle), np.sin(angle)
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    return np.hypot(u / a, v / b), np.arctan2(y - cy, x - cx)


def _patch_for(points: list[np.ndarray], margin: float) -> tuple[list[np.ndarray], int, int]:
    """Shift point sets (x, y) so they sit `margin` px inside a fresh patch; return its size."""
    allp = np.concatenate(points)
    lo = allp.min(axis=0) - margin
    hi = allp.max(axis=0) + margin
    w, h = (np.ceil(hi - lo)).astype(int)
    return [p - lo for p in points], int(h), int(w)


def _polyline_field(
    y: np.ndarray, x: np.ndarray, pts: np.ndarray, half_width: np.ndarray
) -> np.ndarray:
    """Signed distance to a polyline whose half-width varies per vertex (< 0 inside).

    Vectorised over pixels x segments: patches are small (< 100^2 px, < 100 segments).
    """
    a, b = pts[:-1], pts[1:]
    ab = b - a
    p = np.stack([x.ravel(), y.ravel()], axis=1)[:, None, :]  # (P, 1, 2)
    ap = p - a[None]
    t = np.clip((ap * ab[None]).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-9)[None], 0.0, 1.0)
    q = ap - t[..., None] * ab[None]
    d = np.sqrt(q[..., 0] ** 2 + q[..., 1] ** 2)  # (P, S)
    hw = half_width[:-1][None] * (1 - t) + half_width[1:][None] * t
    return (d - hw).min(axis=1).reshape(y.shape)


def _coverage(field: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of the region field < 0 (one-pixel ramp)."""
    return np.clip(0.5 - field, 0.0, 1.0)


def _line_angle(rng: np.random.Generator) -> float:
    """A few orientations, neither axis-aligned (boxes too thin) nor 45 deg (boxes mostly empty)."""
    base = rng.choice([20.0, 30.0, 60.0, 70.0]) + rng.uniform(-5, 5)
    return float(np.deg2rad(base * rng.choice([-1, 1])))


def _jagged_path(rng: np.random.Generator, length: float, step: float, jitter: float) -> np.ndarray:
    """A crack centre line along +x: low-frequency wander plus high-frequency zig-zag."""
    n = max(8, int(length / step))
    u = np.linspace(0, length, n)
    u[1:-1] += rng.uniform(-0.3, 0.3, n - 2) * step
    wander = ndimage.gaussian_filter1d(rng.normal(0, 1, n).cumsum(), 2.0)
    wander = (wander - np.linspace(wander[0], wander[-1], n)) * (
        0.03 * length / (np.ptp(wander) + 1e-9)
    )
    v = wander + rng.normal(0, jitter, n)
    return np.stack([u, v], axis=1)


# ---- the six classes ------------------------------------------------------------------


def _normal(rng: np.random.Generator, sc: Scene) -> Stamp:
    """A clean machined face: a turned boss (concentric rings) or a milled pad (arcs)."""
    s = sc.size
    if rng.random() < 0.55:
        r = rng.uniform(0.08, 0.2) * s
        m = 3.0
        h = w = int(np.ceil(2 * (r + m)))
        y, x = _grid(h, w)
        rn, ang = _ellipse(y, x, h / 2, w / 2, r, r, 0.0)
        sd = rn * r - r  # signed distance to the rim
        inside = _coverage(sd)
        rings = np.sin(2 * np.pi * rn * r / rng.uniform(2.2, 3.2))
        # Chamfer lit on the side facing the light (a raised part; a dent is lit the other way).
        edge = np.cos(ang - np.arctan2(sc.light[1], sc.light[0]))
    else:
        pw, ph = rng.uniform(0.16, 0.4, 2) * s
        m = 3.0
        h, w = int(np.ceil(ph + 2 * m)), int(np.ceil(pw + 2 * m))
        y, x = _grid(h, w)
        # Rounded-rectangle signed distance, corner radius a fraction of the short side.
        cr = 0.25 * min(pw, ph)
        qx = np.abs(x - w / 2) - (pw / 2 - cr)
        qy = np.abs(y - h / 2) - (ph / 2 - cr)
        sd = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - cr
        inside = _coverage(sd)
        # Fly-cutter marks: arcs around a centre far outside the pad.
        ca = rng.uniform(0, 2 * np.pi)
        cx, cy = w / 2 + 2.5 * pw * np.cos(ca), h / 2 + 2.5 * ph * np.sin(ca)
        rings = np.sin(2 * np.pi * np.hypot(x - cx, y - cy) / rng.uniform(2.5, 3.5))
        # Bevel lit on the side facing the light: outward normal of the pad edge.
        nx = np.sign(x - w / 2) * (qx >= qy)
        ny = np.sign(y - h / 2) * (qy > qx)
        edge = nx * sc.light[0] + ny * sc.light[1]
    level = rng.uniform(1.08, 1.2)
    chamfer = _coverage(np.abs(sd + 1.5) - 1.5)
    groove = _coverage(np.abs(sd) - 0.7)  # the thin parting line around the face
    gain = 1 + inside * (level - 1 + rng.uniform(0.03, 0.06) * rings)
    gain = gain * (1 + 0.25 * chamfer * edge) * (1 - 0.35 * groove)
    flat = 0.85 * inside
    return Stamp(gain, flat, (np.abs(gain - 1) > VISIBLE) | (flat > VISIBLE))


def _perforation(rng: np.random.Generator, sc: Scene) -> Stamp:
    """A round hole: dark inside, the far inner wall lit, a bright burr rim."""
    s = sc.size
    a = rng.uniform(0.05, 0.14) * s
    b = a * rng.uniform(0.85, 1.0)
    rim = rng.uniform(1.5, 3.0) * s / 192
    m = rim + 2
    h = w = int(np.ceil(2 * (a + m)))
    y, x = _grid(h, w)
    rn, ang = _ellipse(y, x, h / 2, w / 2, a, b, rng.uniform(0, np.pi))
    d = (rn - 1) * b  # ~ pixels outside the hole edge
    hole = _coverage(d)
    rim_c = _coverage(np.abs(d - rim / 2) - rim / 2)
    toward = np.cos(ang - np.arctan2(sc.light[1], sc.light[0]))
    # The inner wall facing the light (the far side of the hole) catches a crescent of light.
    wall = np.clip(-toward, 0, 1) * np.clip(rn, 0, 1) ** 4
    inner = rng.uniform(0.04, 0.12) + 0.35 * wall
    gain = (1 - hole) + hole * inner
    gain = gain * (1 + rim_c * (rng.uniform(0.3, 0.55) + 0.15 * toward))
    return Stamp(gain, np.zeros_like(gain), np.abs(gain - 1) > VISIBLE)


def _fracture(rng: np.random.Generator, sc: Scene) -> Stamp:
    """A jagged, branching crack: a dark gap of varying width with a bright broken lip."""
    s = sc.size
    length = rng.uniform(0.25, 0.45) * s
    k = s / 192
    main = _jagged_path(rng, length, step=2.5 * k, jitter=rng.uniform(0.6, 1.4) * k)
    t = np.linspace(0, 1, len(main))
    hw_main = rng.uniform(0.9, 1.8) * k * np.sin(np.pi * t).clip(0.1) ** 0.4
    hw_main *= np.exp(rng.normal(0, 0.3, len(main)))  # the separation opens and closes
    paths, widths = [main], [hw_main]
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        j = rng.integers(int(0.2 * len(main)), int(0.8 * len(main)))
        blen = rng.uniform(0.15, 0.35) * length
        br = _jagged_path(rng, blen, step=2.5 * k, jitter=rng.uniform(0.6, 1.2) * k)
        br = br @ _rot(rng.choice([-1, 1]) * np.deg2rad(rng.uniform(25, 60))).T + main[j]
        tb = np.linspace(0, 1, len(br))
        paths.append(br)
        widths.append(hw_main[j] * 0.7 * (1 - tb) + 0.3 * k * tb)
    rot = _rot(_line_angle(rng))
    paths, h, w = _patch_for([p @ rot.T for p in paths], margin=4 * k)
    y, x = _grid(h, w)
    field = np.min(
        [_polyline_field(y, x, p, hw) for p, hw in zip(paths, widths, strict=True)], axis=0
    )
    gap = _coverage(field)
    lip = _coverage(np.abs(field - 0.9 * k) - 0.6 * k) * (1 - gap)
    gain = (1 - gap * (1 - rng.uniform(0.05, 0.18))) * (1 + rng.uniform(0.15, 0.3) * lip)
    return Stamp(gain, np.zeros_like(gain), np.abs(gain - 1) > VISIBLE)


def _scratch(rng: np.random.Generator, sc: Scene) -> Stamp:
    """A smooth tool mark; deep ones are dark grooves with a lit wall, light ones thin lines."""
    s = sc.size
    k = s / 192
    length = rng.uniform(0.25, 0.45) * s
    n = 24
    t = np.linspace(0, 1, n)
    bow = rng.uniform(-0.08, 0.08) * length  # a gentle curve, never a zig-zag
    pts = np.stack([t * length, 4 * bow * t * (1 - t)], axis=1)
    tangent = np.gradient(pts, axis=0)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    taper = np.clip(np.sin(np.pi * t) * 4, 0.15, 1.0)  # sharp start and end, constant body
    deep = rng.random() < DEEP_SCRATCH_SHARE
    if deep:
        hw = rng.uniform(1.1, 1.8) * k * taper
        side = rng.choice([-1, 1])
        wall = pts + side * normal * (hw[:, None] + 1.0 * k)
        lines = [pts, wall]
        widths = [hw, 0.5 * k * taper]
    else:
        hw = rng.uniform(0.5, 0.9) * k * taper
        lines, widths = [pts], [hw]
    rot = _rot(_line_angle(rng))
    lines, h, w = _patch_for([p @ rot.T for p in lines], margin=3 * k)
    y, x = _grid(h, w)
    core = _coverage(_polyline_field(y, x, lines[0], widths[0]))
    if deep:
        wall = _coverage(_polyline_field(y, x, lines[1], widths[1])) * (1 - core)
        gain = (1 - core * (1 - rng.uniform(0.12, 0.3))) * (1 + rng.uniform(0.25, 0.4) * wall)
    else:
        contrast = rng.uniform(0.3, 0.5) * rng.choice([-1, 1])  # bright or dark mark
        gain = 1 + contrast * core
    return Stamp(gain, np.zeros_like(gain), np.abs(gain - 1) > VISIBLE)


def _dent(rng: np.random.Generator, sc: Scene) -> Stamp:
    """A depression: the wall facing the light is lit, the other in shadow, a creased rim."""
    s = sc.size
    a = rng.uniform(0.07, 0.19) * s
    b = a * rng.uniform(0.6, 1.0)
    m = 3.0
    h = w = int(np.ceil(2 * (a + m)))
    y, x = _grid(h, w)
    rn, _ = _ellipse(y, x, h / 2, w / 2, a, b, rng.uniform(0, np.pi))
    d = (rn - 1) * b  # ~ pixels outside the rim
    inside = _coverage(d)
    gy, gx = np.gradient(-(1 - rn**2).clip(0))
    # Lambert-like shading: brighter where the surface tilts toward the light.
    shade = -(gx * sc.light[0] + gy * sc.light[1])
    shade *= rng.uniform(0.3, 0.45) / (np.abs(shade).max() + 1e-9)
    # The crease along the rim outlines the dent even where the light grazes it.
    crease = _coverage(np.abs(d) - 0.6)
    gain = (1 + shade) * (1 - 0.1 * inside) * (1 - rng.uniform(0.12, 0.2) * crease)
    # Pressed metal loses part of its grain.
    flat = 0.5 * inside
    return Stamp(gain, flat, (np.abs(gain - 1) > VISIBLE) | (flat > VISIBLE))


def _contamination(rng: np.random.Generator, sc: Scene) -> Stamp:
    """A faint brownish stain with a drying ring, or a cluster of small dark particles."""
    s = sc.size
    a = rng.uniform(0.07, 0.17) * s
    b = a * rng.uniform(0.6, 1.0)
    h = w = int(np.ceil(2 * a + 6))
    y, x = _grid(h, w)
    rn, _ = _ellipse(y, x, h / 2, w / 2, a, b, rng.uniform(0, np.pi))
    tint = np.array([1.0, 1.25, 1.8])  # darkens blue most: a warm, oily tone
    if rng.random() < 0.55:
        noise = ndimage.gaussian_filter(rng.normal(0, 1, (h, w)), a / 4)
        noise /= np.abs(noise).max() + 1e-9
        field = (1 - rn**2) + 0.45 * noise
        stain = np.clip((field - 0.2) / 0.15, 0, 1)
        ring = 4 * stain * (1 - stain)
        dark = rng.uniform(0.07, 0.13) * stain + 0.06 * ring
        gain = 1 - dark[..., None] * tint
    else:
        n = rng.integers(15, 50)
        r = np.sqrt(rng.uniform(0, 1, n))
        th = rng.uniform(0, 2 * np.pi, n)
        c, sn = np.cos(rng.uniform(0, np.pi)), np.sin(rng.uniform(0, np.pi))
        u, v = r * a * np.cos(th), r * b * np.sin(th)
        px, py = w / 2 + u * c - v * sn, h / 2 + u * sn + v * c
        rad = rng.uniform(0.6, 1.6, n) * s / 192
        d = np.hypot(x[..., None] - px, y[..., None] - py) - rad
        dots = _coverage(d.min(axis=-1))
        haze = np.clip(1 - rn, 0, 1) ** 0.5 * 0.04
        dark = rng.uniform(0.3, 0.5) * dots + haze
        gain = 1 - dark[..., None] * tint * 0.8
    gain = np.clip(gain, 0, None)
    return Stamp(gain, np.zeros((h, w)), np.abs(gain - 1).max(axis=-1) > VISIBLE)


DRAWERS = (_normal, _perforation, _fracture, _scratch, _dent, _contamination)


# ---- the surface ----------------------------------------------------------------------


def _surface(rng: np.random.Generator, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey metal texture (s, s) and its zero-mean fine texture (for the specular sheen)."""
    amp = rng.uniform(0.025, 0.05)
    if rng.random() < 0.65:  # brushed: noise smeared along one direction
        big = int(np.ceil(s * 1.5))
        noise = rng.normal(0, 1, (big, big))
        streak = ndimage.uniform_filter1d(noise, int(rng.integers(25, 70)), axis=1)
        fine = ndimage.uniform_filter1d(noise, 7, axis=1)
        tex = streak / streak.std() + 0.6 * fine / fine.std()
        angle = rng.choice([0.0, 90.0]) + rng.uniform(-20, 20)
        tex = np.asarray(
            Image.fromarray(tex.astype(np.float32), mode="F").rotate(
                float(angle), resample=Image.Resampling.BILINEAR
            )
        )
        o = (big - s) // 2
        tex = tex[o : o + s, o : o + s].astype(np.float64)
    else:  # blasted / matte: isotropic grain plus mottling
        grain = ndimage.gaussian_filter(rng.normal(0, 1, (s, s)), rng.uniform(0.7, 1.3))
        mottle = ndimage.gaussian_filter(rng.normal(0, 1, (s, s)), s / 20)
        tex = grain / grain.std() + 0.3 * mottle / mottle.std()
        amp *= 0.6  # isotropic grain reads as much busier than streaks of the same variance
    tex = (tex - tex.mean()) / (tex.std() + 1e-9)
    base = rng.uniform(0.38, 0.6) + amp * tex
    return base, tex


def _lighting(
    rng: np.random.Generator, s: int, light: np.ndarray, tex: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A multiplicative gradient toward the light and an additive soft highlight."""
    y, x = _grid(s, s)
    y, x = y / s - 0.5, x / s - 0.5
    grad = 1 + rng.uniform(0.15, 0.4) * (x * light[0] + y * light[1])
    cy, cx = rng.uniform(-0.4, 0.4, 2)
    ang = rng.uniform(0, np.pi)
    u = (x - cx) * np.cos(ang) + (y - cy) * np.sin(ang)
    v = -(x - cx) * np.sin(ang) + (y - cy) * np.cos(ang)
    su, sv = rng.uniform(0.3, 0.8), rng.uniform(0.08, 0.25)
    spec = rng.uniform(0.06, 0.22) * np.exp(-0.5 * ((u / su) ** 2 + (v / sv) ** 2))
    spec = spec * (1 + 0.4 * tex).clip(0)  # the sheen follows the grain
    return grad, spec


def render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """One image (size, size, 3) uint8 and its objects as (class id, [x, y, w, h])."""
    la = rng.uniform(0, 2 * np.pi)
    light = np.array([np.cos(la), np.sin(la)])
    base, tex = _surface(rng, size)
    tint = 1 + rng.normal(0, 0.015, 3)
    img = base[..., None] * tint
    sc = Scene(size, light)
    objects: list[tuple[int, list[float]]] = []
    taken: list[tuple[int, int, int, int]] = []
    n_obj = rng.choice(OBJECTS_PER_IMAGE, p=OBJECTS_WEIGHTS)
    for _ in range(n_obj):
        cls = int(rng.choice(len(CLASS_NAMES), p=CLASS_WEIGHTS))
        st = DRAWERS[cls](rng, sc)
        x0, y0, x1, y1 = st.box()
        at = _place(rng, size, x1 - x0, y1 - y0, taken)
        if at is None:
            continue  # no room left: drop it (large objects are dropped a little more often)
        ox, oy = at[0] - x0, at[1] - y0
        _apply(img, st, ox, oy)
        taken.append((at[0], at[1], at[0] + x1 - x0, at[1] + y1 - y0))
        objects.append((cls, [float(at[0]), float(at[1]), float(x1 - x0), float(y1 - y0)]))
    grad, spec = _lighting(rng, size, light, tex)
    img = img * grad[..., None] + spec[..., None]
    # A soft shoulder instead of clipping: a highlight must not wash a defect out to flat white.
    knee = 0.8
    img = np.where(img > knee, knee + (1 - knee) * np.tanh((img - knee) / (1 - knee)), img)
    # Sensor noise: mostly shared by the channels (luminance), a little chroma.
    img += rng.normal(0, rng.uniform(0.008, 0.02), (size, size, 1))
    img += rng.normal(0, 0.004, (size, size, 3))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), objects


def _place(
    rng: np.random.Generator, size: int, bw: int, bh: int, taken: list[tuple[int, int, int, int]]
) -> tuple[int, int] | None:
    """Top-left corner for a bw x bh box 1 px inside the image, 2 px clear of every taken box."""
    if bw > size - 2 or bh > size - 2:
        return None
    for _ in range(20):
        x, y = int(rng.integers(1, size - 1 - bw + 1)), int(rng.integers(1, size - 1 - bh + 1))
        if all(
            x >= t[2] + 2 or t[0] >= x + bw + 2 or y >= t[3] + 2 or t[1] >= y + bh + 2
            for t in taken
        ):
            return x, y
    return None


def _apply(img: np.ndarray, st: Stamp, ox: int, oy: int) -> None:
    """Composite a stamp whose patch origin lands at (ox, oy); the patch may hang off the image."""
    s = img.shape[0]
    ph, pw = st.mask.shape
    x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + pw, s), min(oy + ph, s)
    sl = (slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox))
    region = img[y0:y1, x0:x1]
    flat = st.flat[sl][..., None]
    gain = st.gain[sl]
    if gain.ndim == 2:
        gain = gain[..., None]
    mean = region.mean(axis=(0, 1), keepdims=True)
    img[y0:y1, x0:x1] = (region * (1 - flat) + mean * flat) * gain


# ---- the dataset ----------------------------------------------------------------------


def _check(out: Path, spec: SynthSpec) -> None:
    if spec.seed < 0:
        raise UserError(f"synth spec: seed must be >= 0, got {spec.seed}")
    for name in ("n_train", "n_val", "n_test"):
        if getattr(spec, name) < 1:
            raise UserError(f"synth spec: {name} must be >= 1, got {getattr(spec, name)}")
    if spec.image_size < MIN_IMAGE_SIZE:
        raise UserError(
            f"synth spec: image_size must be >= {MIN_IMAGE_SIZE}, got {spec.image_size}"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    # Empty sub-folders do not count: Snakemake makes annotations/ before the job runs.
    if out.is_dir() and any(f.is_file() for f in out.rglob("*")):
        # Only regenerate over an earlier synth dataset, never over someone else's files.
        prev = coco.split_path(out, "train")
        info = coco.load_json(prev).get("info", {}) if prev.is_file() else {}
        ours = isinstance(info, dict) and info.get("dataset") == "synth"
        if not ours and coco.manifest_writer(out) != "synth":  # JSONs removed by a runner
            raise UserError(
                f"{out}: folder is not empty and holds no synth dataset; choose a new --out"
            )
        # The new dataset replaces the folder whole: files the old one did not list are not ours.
        foreign = coco.foreign_files(out)
        if foreign:
            raise UserError(
                f"{out}: folder is not empty and holds {len(foreign)} file(s) that are not "
                f"part of its synth dataset, e.g. {foreign[0]}; move them or choose a new --out"
            )


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Sensor noise leaves little to compress: the fastest level gives the same size.
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _make(job: tuple[int, int, int, int]) -> tuple[bytes, list[tuple[int, list[float]]]]:
    """Render one image from (seed, split index, image id, size): its PNG bytes and objects."""
    seed, si, image_id, size = job
    arr, objects = render(np.random.default_rng([seed, si, image_id]), size)
    return _png_bytes(arr), objects


def _default_workers(n_images: int) -> int:
    # A pool only pays for itself on real runs; small ones (tests) stay in-process.
    return 1 if n_images < 64 else max(1, min(len(os.sched_getaffinity(0)), 8))


def generate(out: str | Path, spec: SynthSpec, workers: int | None = None) -> dict[str, Any]:
    """Write the synth dataset to `out` in the layout of `coco.py`; return per-split counts.

    `workers` processes render the images (default: the available cores); the files do not
    depend on it, because each image has its own seed.
    """
    out = Path(out)
    _check(out, spec)
    sizes = {"train": spec.n_train, "val": spec.n_val, "test": spec.n_test}
    jobs = [
        (spec.seed, si, image_id, spec.image_size)
        for si, split in enumerate(coco.SPLITS)
        for image_id in range(1, sizes[split] + 1)
    ]
    workers = workers or _default_workers(len(jobs))
    # Built in a staging folder beside `out` and swapped in when complete: a run killed
    # half-way leaves the earlier dataset whole, never new images under old JSONs.
    with staged_dir(out) as staging:
        summary = _generate_into(staging, spec, sizes, jobs, workers)
        # The generator is checked by the same validator users run on their own data.
        from defectfusion.data.validate import raise_if_invalid, validate_path

        report = validate_path(staging, check_images=True)
        report.errors = [e.replace(str(staging), str(out)) for e in report.errors]
        raise_if_invalid(report)
        coco.write_manifest(staging, "synth")
        _check(out, spec)  # again: someone may have put files there meanwhile
        swap_dir(staging, out)
    return summary


def _generate_into(
    out: Path, spec: SynthSpec, sizes: dict[str, int], jobs: list, workers: int
) -> dict[str, Any]:
    # Spawned, not forked, and killed with this process (defectfusion/core/pool.py).
    pool = spawn_pool(workers) if workers > 1 else None
    results = pool.map(_make, jobs, chunksize=16) if pool else map(_make, jobs)
    summary: dict[str, Any] = {}
    try:
        with tqdm(total=len(jobs), desc="synth", unit="img", disable=None) as bar:
            for split in coco.SPLITS:
                summary[split] = _write_split(out, spec, split, sizes[split], results, bar)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return summary


def _write_durably(path: Path, data: bytes) -> None:
    """Plain write plus fsync: the staging folder is private, so no temp-and-rename per file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_split(
    out: Path, spec: SynthSpec, split: str, n: int, results: Iterator, bar: tqdm
) -> dict[str, Any]:
    """Take the next `n` rendered images from `results`; write them and the split JSON."""
    images, anns = [], []
    img_dir = coco.images_dir(out) / split
    for image_id in range(1, n + 1):
        png, objects = next(results)
        file_name = f"{split}/{image_id:05d}.png"
        _write_durably(coco.images_dir(out) / file_name, png)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": spec.image_size,
                "height": spec.image_size,
                "source_file": f"synth/seed{spec.seed}/{file_name}",
            }
        )
        for cls, box in objects:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cls,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
        bar.update()
    # A smaller regeneration must not leave the previous run's extra images behind.
    for stale in sorted(img_dir.glob("*.png")):
        if stale.stem.isdigit() and int(stale.stem) > n:
            stale.unlink()
    # Only what made this split: growing the test split leaves train.json byte-identical, so
    # DVC (content hashes) retrains nothing when only the test split changes.
    info = {"dataset": "synth", "split": split, "seed": spec.seed, "image_size": spec.image_size}
    coco.write_split(out, split, coco.make_coco(images, anns, CLASS_NAMES, info))
    counts = np.bincount([a["category_id"] for a in anns], minlength=len(CLASS_NAMES))
    return {
        "images": len(images),
        "boxes": {name: int(c) for name, c in zip(CLASS_NAMES, counts, strict=True)},
    }
