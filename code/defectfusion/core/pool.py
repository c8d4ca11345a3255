"""Process pools whose workers die with their parent.

`concurrent.futures.ProcessPoolExecutor` notices a dead parent only when it next reads its
call queue, and a worker blocked there (or in a long task) outlives a ``kill -9`` of the
parent, with the multiprocessing resource tracker beside it. The standard library has no
option for that, so each worker asks the Linux kernel to send it SIGKILL when its parent
goes (``prctl(PR_SET_PDEATHSIG)``, the mechanism torch's DataLoader workers rely on too);
the resource tracker then exits on its own once no process holds its pipe. Elsewhere
(macOS, Windows) the pool is the plain one.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with(parent: int, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    if initializer is not None:
        initializer(*initargs)


def spawn_pool(
    workers: int, initializer: Callable[..., Any] | None = None, initargs: tuple = ()
) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes (no fork of a parent that may hold torch or
    BLAS threads), each killed by the kernel when the process that made the pool dies."""
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_die_with,
        initargs=(os.getpid(), initializer, initargs),
    )
