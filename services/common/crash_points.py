"""Fault injection for the crash tests of the money processes (payouts executor, deposits watcher): a named
checkpoint crashes the process the n-th time it is reached, so a test can show the next run finishes the work.

``crash_at="<checkpoint>[:n]"`` (in-process tests) raises :class:`InjectedCrash`; the same spec in the process's
crash environment variable (subprocess tests) SIGKILLs it. Nothing happens in production, where neither is set."""

from __future__ import annotations

import os
import signal
from typing import Optional

from services.common.logs import get_logger

log = get_logger(__name__)


class InjectedCrash(BaseException):
    """Raised at a checkpoint by in-process crash tests (BaseException: nothing may swallow it)."""


class CrashPoints:
    """Call it with a checkpoint's name where the process may crash: ``checkpoint("signed", batch_number=7)``."""

    def __init__(self, event: str, crash_at: Optional[str], env_name: str):
        self.event = event  # the log line of an injected crash, e.g. "payouts.crash_injected"
        self._specs = ((crash_at, False), (os.environ.get(env_name), True))
        self._seen: dict[str, int] = {}

    def __call__(self, name: str, **context) -> None:
        count = self._seen[name] = self._seen.get(name, 0) + 1
        for spec, hard in self._specs:
            if not spec:
                continue
            target, _, nth = spec.partition(":")
            if target == name and count == int(nth or 1):
                log.warning(self.event, checkpoint=name, n=count, **context)
                if hard:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise InjectedCrash(name)
