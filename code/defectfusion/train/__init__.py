"""Training: `engine` is the loop both phases share; `phase1` and `phase2` set it up."""
