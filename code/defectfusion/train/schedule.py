"""Schedules, counted in steps or epochs (torch-free: the report reads them too).

- ``lr_lambda``: warm-up (linear or DEIM's quadratic), flat, then cosine (DEIM's flat-cosine);
- ``ema_decay_at``: DEIMv2's EMA decay ramp;
- ``plateau_gain``: whether a run reached its plateau (``phase1.plateau_*`` in params.yaml).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any


def lr_lambda(total_steps: int, tc: Any) -> Callable[[int], float]:
    """Warm-up, flat, cosine down to ``min_lr_fraction``, then held there for the last
    ``final_fraction`` of the steps (DEIM's flat-cosine and its final epochs at the minimum
    learning rate). ``warmup_shape``: ``linear`` ((t+1)/W) or ``quadratic`` (((t+1)/W)^2,
    DEIM's FlatCosineLRScheduler: a gentler start for a pretrained backbone)."""
    warm = max(0, tc.warmup_steps)
    power = 2 if getattr(tc, "warmup_shape", "linear") == "quadratic" else 1
    flat_end = max(warm, int(total_steps * tc.flat_fraction))
    final = getattr(tc, "final_fraction", 0.0)
    decay_end = max(flat_end, total_steps - int(round(total_steps * final)))

    def f(step: int) -> float:
        if step < warm:
            return ((step + 1) / warm) ** power
        if step < flat_end or total_steps <= flat_end:
            return 1.0
        t = min(1.0, (step - flat_end) / max(1, decay_end - flat_end))
        return tc.min_lr_fraction + (1 - tc.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def ema_decay_at(update: int, decay: float, warmup_steps: int) -> float:
    """DEIMv2's EMA decay at its ``update``-th update: d * (1 - exp(-t / warmup)).

    A fixed 0.9999 would keep 0.9999^4500 = 64 % of the EMA on the random initial weights
    after a 4,500-step run; the ramp starts near 0 (the EMA follows the raw weights) and
    tends to ``decay``. ``warmup_steps`` 0 means no ramp.
    """
    if warmup_steps <= 0:
        return decay
    return decay * (1.0 - math.exp(-update / warmup_steps))


def plateau_gain(
    history: Sequence[dict[str, Any]], fraction: float, metric: str = "val_map"
) -> dict[str, Any]:
    """The val gain over the last ``fraction`` of the epochs run: ``metric`` at the last
    epoch E minus at epoch E - round(fraction * E) (at least one epoch back: 10 epochs and
    0.2 give epoch 10 minus epoch 8). A gain below ``phase1.plateau_min_gain``: plateaued."""
    rows = [r for r in history if r.get("epoch", 0) >= 1 and r.get(metric) is not None]
    if len(rows) < 2:
        return {"gain": None, "from_epoch": None, "to_epoch": None}
    last = rows[-1]["epoch"]
    start = last - max(1, round(fraction * last))
    ref = [r for r in rows if r["epoch"] <= start][-1]
    return {
        "gain": rows[-1][metric] - ref[metric],
        "from_epoch": ref["epoch"],
        "to_epoch": last,
    }
