"""HiGHS prints a copyright banner to stdout the first time any ``Highs`` object is made in a process.

Backends that make one (ours, or cvxpy's on our behalf) call :func:`mute_highs_banner` first, so
that the banner is spent on a throwaway object with stdout pointed at /dev/null.
"""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()
_done = False


def mute_highs_banner() -> None:
    """Construct one ``highspy.Highs`` with file descriptor 1 muted (once per process)."""
    global _done
    with _lock:
        if _done:
            return
        _done = True
        try:
            import highspy
        except ImportError:
            return
        try:
            saved = os.dup(1)
        except OSError:
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
            highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)
