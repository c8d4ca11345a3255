"""The data layer: every importer writes the COCO layout of `coco.py`; every reader reads it."""
