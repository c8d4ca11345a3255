"""defectfusion: DEIMv2 + DINOv3 defect detection with residual vision-language fusion."""

__version__ = "0.1.0"
