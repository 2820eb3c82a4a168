"""Child processes the demo, the benchmarks and the tests start, each stopped by PID with its whole tree.

Every process starts in its own session (process group), so a stop reaches its helpers (Petals handler
processes, p2pd) too; the tree is also collected with psutil before signalling, so nothing is orphaned even
if a child moved to another group. Never ``pkill -f``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import psutil

from services.common.process_tree import kill_all


class ManagedProcess:
    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path, env: Optional[dict] = None,
                 cwd: Optional[Path] = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.popen: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, cwd=self.cwd, start_new_session=True)
        log.close()
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def tree_pids(self) -> set[int]:
        return {p.pid for p in self.tree()}

    def kill(self) -> None:
        """SIGKILL the whole tree at once (a machine dying)."""
        procs = self.tree()
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_all(procs)
        if self.popen is not None:
            self.popen.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> Optional[int]:
        """SIGTERM the leader (it shuts its children down), wait, then SIGKILL anything left."""
        if self.popen is None:
            return None
        procs = self.tree()
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        if alive or self.alive():
            self.kill()
        return self.popen.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def wait_until(predicate: Callable[[], object], *, timeout: float, interval: float = 0.25,
               what: str = "condition", process: Optional[ManagedProcess] = None):
    """Poll ``predicate`` until it returns a truthy value; raise with the process's log tail on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited while waiting for {what}:\n{process.tail()}")
        if time.monotonic() > deadline:
            tail = f":\n{process.tail()}" if process is not None else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(interval)


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
