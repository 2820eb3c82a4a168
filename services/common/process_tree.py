"""Stopping a process tree by PID (never by name): what the shipped provider node needs of process handling.
The dev harness's launchers (infra/processes.py) build on it."""

from __future__ import annotations

import psutil


def kill_all(procs, *, timeout: float = 10.0) -> None:
    """SIGKILL each ``psutil.Process`` (those already gone are skipped) and wait for them to be reaped."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=timeout)


def reap_children(timeout: float = 5.0) -> None:
    """Last line of defence against orphans: SIGTERM every descendant of this process, SIGKILL the survivors."""
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    kill_all(alive, timeout=timeout)
