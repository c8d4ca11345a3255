"""defectfusion: DEIMv2 + DINOv3 defect detection with residual vision-language fusion."""

from __future__ import annotations

import typing as _typing

if _typing.TYPE_CHECKING:  # torch is imported lazily, by `load`
    from pathlib import Path

    import torch

    from defectfusion.serve.predict import Detector

from defectfusion.core.version import __version__

__all__ = ["__version__", "load"]


def __dir__() -> list[str]:
    """The public names (``dir(defectfusion)`` listed Path, TYPE_CHECKING and annotations)."""
    return sorted(__all__)


def load(path: str | Path, device: str | torch.device | None = None) -> Detector:
    """A trained detector from a checkpoint or an exported folder: ``load(p).predict(images)``.

    See `defectfusion.serve.predict.load`; imported lazily so ``import defectfusion`` (and the CLI's
    ``--help``) does not pay for torch.
    """
    from defectfusion.serve.predict import load as _load  # deferred: loads torch

    return _load(path, device)
