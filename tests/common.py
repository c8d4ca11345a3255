"""What many test modules share, in one place: the synthetic dataset's class names and the
preset most model tests build."""

from defectfusion.data.synth import CLASS_NAMES

NAMES = list(CLASS_NAMES)  # the synth dataset's six classes, in id order
TINY = "deimv2-dinov3-tiny"  # the smallest ViT preset
