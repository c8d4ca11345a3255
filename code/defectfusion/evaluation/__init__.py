"""Scoring a checkpoint on a split: COCO metrics, critical recall and the composite score
(`metrics`), and the evaluation that writes a run's metrics files (`evaluate`). Below
training, which evaluates on val every epoch."""
