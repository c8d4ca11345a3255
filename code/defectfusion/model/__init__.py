"""The detector and what Phase 2 adds to it: DEIMv2 presets (`models`), the losses, the
residual vision-language fusion (`fusion`), the text encoders (`text`), checkpoints, and the
cache of the frozen part's features (`cache`)."""
