"""Statistics over finished runs, from their results files only: the bootstrap intervals,
the per-seed comparison with Phase 1 (`compare`), the post-mortem's verdict and `verify`
(a rerun judged against the recorded results)."""
