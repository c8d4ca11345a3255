"""defectfusion: DEIMv2 + DINOv3 defect detection with residual vision-language fusion."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily, by `load`
    import torch

    from defectfusion.predict import Detector

__version__ = "0.1.0"


def load(path: str | Path, device: str | torch.device | None = None) -> Detector:
    """A trained detector from a checkpoint or an exported folder: ``load(p).predict(images)``.

    See `defectfusion.predict.load`; imported lazily so ``import defectfusion`` (and the CLI's
    ``--help``) does not pay for torch.
    """
    from defectfusion.predict import load as _load

    return _load(path, device)
