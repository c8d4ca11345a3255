"""Atomic writes."""

from __future__ import annotations


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    """mkstemp's private 0600 must not leak into results others read (a DVC remote, a web server)."""
    import os

    from defectfusion.core.fsutil import atomic_write_json

    umask = os.umask(0o022)
    try:
        out = atomic_write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o644
