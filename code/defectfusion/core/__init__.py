"""The floor everything stands on: one-line user errors, atomic file writes, the JSON reader
for files from elsewhere, the run's environment and version, the worker pool. Imports no
other part of the package."""
