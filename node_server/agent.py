"""``far-node run``: a small supervisor around the Petals server, plus the discovery agent.

- The Petals server runs as a child process (``python -m node_server.petals_server``); in a terminal it gets
  its own session, so a Ctrl-C reaches only the supervisor, which shuts things down in order. If the child dies,
  the supervisor says why (exit code or signal, the last lines of its output), kills whatever it left behind
  (handler processes, p2pd) and starts it again with exponential backoff (1 s, 2 s, 4 s ... 60 s; reset after
  it has run for a minute).
- The agent thread registers with discovery (challenge, signature by the node's identity key), sends a
  heartbeat every ``heartbeat_interval_s`` (discovery's answer, 30 s, or ``--heartbeat-interval``) and prints
  the status line. If discovery is unreachable the node keeps serving (the swarm does not depend on it) and
  registration is retried with backoff; a 401 on a heartbeat means "register again".
- SIGINT/SIGTERM: the server announces OFFLINE and stops, the node unregisters, and no process of its tree
  is left (the supervisor is a child subreaper on Linux, so even orphans of a killed server come back to it).
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TextIO

import psutil

from services.common.process_tree import kill_all
from node_server import keys
from node_server.discovery_client import (DiscoveryClient, DiscoveryError, DiscoveryRefused, NotRegistered,
                                          Registration)
from node_server.petals_server import ServerOptions
from services.common.logs import get_logger
from services.common.money import format_far_truncated

log = get_logger("far-node")
GB = 1024**3
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
# Heartbeats report the server's state as discovery's API spells it; a server that is not up (starting,
# restarting, stopping) sends no heartbeat, so discovery drops the node from the active set after its TTL.
HEARTBEAT_STATES = {"JOINING": "joining", "ONLINE": "online"}


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _child_preexec() -> None:  # runs in the forked child before exec
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # the supervisor died (even by SIGKILL): stop too


def in_terminal_foreground() -> bool:
    """True when this process belongs to the foreground process group of its controlling terminal."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def describe_exit(returncode: Optional[int]) -> str:
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


def backoff_delay(failures: int, *, initial: float = 1.0, maximum: float = 60.0) -> float:
    """1, 2, 4, ... seconds, capped (no jitter: one server per node, nobody to desynchronize from)."""
    return min(maximum, initial * 2 ** max(0, failures))


def status_line(*, tokens: Optional[int], earned: Optional[str], memory: str, blocks: str, state: str,
                note: Optional[str] = None, prefix: str = "[Heartbeat]") -> str:
    """``[Heartbeat] Tokens: 1234 | Earned: 0.1234 FAR | VRAM: 22.5/24.0 GB | Blocks 0:16 ONLINE``"""
    parts = []
    if prefix == "[Heartbeat]":
        parts += [f"Tokens: {tokens if tokens is not None else '-'}",
                  f"Earned: {format_far_truncated(earned) if earned is not None else '-'} FAR"]
    parts += [memory, f"Blocks {blocks} {state}"]
    if note:
        parts.append(note)
    return f"{prefix} " + " | ".join(parts)


@dataclass
class AgentConfig:
    options: ServerOptions
    identity_path: Path
    state_dir: Path
    model_id: str
    wallet_address: Optional[str] = None
    public_name: Optional[str] = None
    discovery_url: Optional[str] = None  # None: serve only, never register
    heartbeat_interval: Optional[float] = None  # None: what discovery says (30 s)
    server_command: Optional[list[str]] = None  # tests: a stand-in for the Petals server
    restart_initial_s: float = 1.0
    restart_max_s: float = 60.0
    stable_after_s: float = 60.0
    stop_timeout_s: float = 30.0


def registration_path(state_dir: Path, peer_id: str) -> Path:
    return Path(state_dir) / "registrations" / f"{peer_id}.json"


def save_registration(state_dir: Path, peer_id: str, record: dict) -> None:
    path = registration_path(state_dir, peer_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the node token
    with os.fdopen(fd, "w") as file:
        json.dump(record, file, indent=2)
    os.replace(tmp, path)


def load_registration(state_dir: Path, peer_id: str) -> Optional[dict]:
    try:
        return json.loads(registration_path(state_dir, peer_id).read_text())
    except (OSError, ValueError):
        return None


class ServerProcess:
    """The Petals server child: started in its own session, output forwarded and its tail kept."""

    def __init__(self, argv: list[str], *, output: TextIO, tail_lines: int = 40):
        self.argv = argv
        self.output = output
        self.tail = collections.deque(maxlen=tail_lines)
        self.popen: Optional[subprocess.Popen] = None
        self.started_at = 0.0
        self.known: dict[int, psutil.Process] = {}  # every descendant seen, to sweep after a crash
        self.own_session = False

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.tail.clear()
        # In a terminal, Ctrl-C signals the whole foreground process group at once; p2pd would die before the
        # server could announce OFFLINE. So there the server gets its own session and only the supervisor sees
        # Ctrl-C, then stops the server in order. Elsewhere (a service manager, a test harness) the server stays
        # in the supervisor's process group, so `kill -KILL -<pgid>` still takes the whole node down at once.
        self.own_session = in_terminal_foreground()
        self.popen = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env, start_new_session=self.own_session,
                                      preexec_fn=_child_preexec)
        self.started_at = time.monotonic()
        self.known = {}
        self.refresh_tree()
        threading.Thread(target=self._pump, args=(self.popen.stdout,), name="far-node-server-output",
                         daemon=True).start()

    def _pump(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line)
            try:
                self.output.write(line + "\n")
                self.output.flush()
            except (ValueError, OSError):
                pass
        stream.close()

    @property
    def pid(self) -> Optional[int]:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return self.popen.poll() if self.popen else None

    def uptime(self) -> float:
        return time.monotonic() - self.started_at

    def refresh_tree(self) -> list[psutil.Process]:
        if not self.alive():
            return []
        try:
            root = psutil.Process(self.popen.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for proc in procs:
            self.known.setdefault(proc.pid, proc)
        return procs

    def memory_used_gb(self) -> Optional[float]:
        total = 0
        for proc in self.refresh_tree():
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total / GB if total else None

    def sweep(self, timeout: float = 5.0) -> list[int]:
        """Kill every process the server left behind (handlers, p2pd). Returns the pids that had to be killed."""
        procs = []
        for proc in list(self.known.values()):
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and proc.pid != os.getpid():
                    procs.append(proc)
            except psutil.Error:
                pass
        if self.popen is not None and self.own_session:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        kill_all(procs, timeout=timeout)
        return [p.pid for p in procs]

    def stop(self, timeout: float) -> Optional[int]:
        """SIGTERM: the server announces OFFLINE and stops its handlers; SIGKILL what is left after ``timeout``."""
        if self.popen is None:
            return None
        self.refresh_tree()
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("petals server did not stop in time; killing it", timeout_s=timeout)
        leftovers = self.sweep()
        if leftovers:
            log.warning("killed processes the server left behind", pids=leftovers)
        self.popen.wait(timeout=10)
        return self.popen.returncode


class Supervisor:
    def __init__(self, config: AgentConfig, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
                 client_factory: Callable[[str], DiscoveryClient] = DiscoveryClient):
        self.config = config
        self.out, self.err = out, err
        self.stop_event = threading.Event()
        self.identity = None
        self.server: Optional[ServerProcess] = None
        self.restarts = 0
        self.client_factory = client_factory
        self.agent: Optional[DiscoveryAgent] = None
        run_dir = Path(config.state_dir) / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir

    # -- the server child -------------------------------------------------------------------------------
    def server_argv(self) -> list[str]:
        options_file = self.run_dir / f"{self.identity.peer_id}.options.json"
        options_file.write_text(self.config.options.to_json())
        base = self.config.server_command or [sys.executable, "-m", "node_server.petals_server"]
        return [*base, "--options", str(options_file), "--status-file", str(self.status_file)]

    @property
    def status_file(self) -> Path:
        return self.run_dir / f"{self.identity.peer_id}.status.json"

    def server_status(self) -> dict:
        """What the server child last reported (its state, span, device memory), with liveness folded in."""
        try:
            status = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            status = {}
        server = self.server
        if self.stop_event.is_set():
            state = "OFFLINE"
        elif server is None or server.started_at == 0:
            state = "STARTING"
        elif not server.alive():
            state = "RESTARTING"
        else:
            state = None
        if state is not None or status.get("pid") != server.pid:
            status = {"state": state or "STARTING", **{k: status.get(k) for k in ("device", "gpu", "vram_total_gb")}}
        return status

    def memory_field(self, status: dict) -> str:
        if str(self.config.options.device).startswith("cuda"):
            used, total = status.get("vram_used_gb"), status.get("vram_total_gb")
            if used is None or total is None:
                return "VRAM: n/a"
            return f"VRAM: {used:.1f}/{total:.1f} GB"
        used = self.server.memory_used_gb() if self.server is not None else None
        total = self.config.options.memory_limit_gb or psutil.virtual_memory().total / GB
        return f"RAM: {used:.1f}/{total:.1f} GB" if used is not None else "RAM: n/a"

    # -- lifecycle -----------------------------------------------------------------------------------------
    def request_stop(self, signum=None, _frame=None) -> None:
        if self.stop_event.is_set() and signum is not None:
            log.warning("second stop signal: killing the server now")
            if self.server is not None:
                self.server.sweep(timeout=1)
            return
        if signum is not None:
            log.info("stopping", signal=signal.Signals(signum).name)
        self.stop_event.set()

    def run(self) -> int:
        config = self.config
        created = keys.ensure_identity(config.identity_path)
        self.identity = keys.load_identity(config.identity_path)
        log.info("node identity", peer_id=self.identity.peer_id, identity=str(config.identity_path),
                 created=created)
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.status_file.unlink(missing_ok=True)
        self.agent = DiscoveryAgent(self)
        self.agent.start()
        failures = 0
        try:
            while not self.stop_event.is_set():
                self.server = ServerProcess(self.server_argv(), output=self.err)
                self.server.start()
                log.info("petals server started", pid=self.server.pid, restarts=self.restarts,
                         blocks=str(config.options.blocks or "auto"))
                while not self.stop_event.wait(0.5):
                    self.server.refresh_tree()
                    if not self.server.alive():
                        break
                if self.stop_event.is_set():
                    break
                uptime = self.server.uptime()
                reason = describe_exit(self.server.returncode)
                leftovers = self.server.sweep()
                if uptime >= config.stable_after_s:
                    failures = 0
                delay = backoff_delay(failures, initial=config.restart_initial_s, maximum=config.restart_max_s)
                failures += 1
                self.restarts += 1
                tail = "\n".join(list(self.server.tail)[-15:])
                log.warning(f"petals server {reason} after {uptime:.1f} s; restarting in {delay:g} s",
                            exit_code=self.server.returncode, restarts=self.restarts, killed_leftovers=leftovers,
                            last_output=tail)
                self.err.write(f"far-node: Petals server {reason} after {uptime:.1f} s; restarting in {delay:g} s "
                               f"(restart #{self.restarts}). Its last output:\n{tail}\n")
                self.err.flush()
                self.stop_event.wait(delay)
        finally:
            self.stop_event.set()
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        if self.server is not None:
            code = self.server.stop(self.config.stop_timeout_s)
            log.info("petals server stopped (announced OFFLINE)", exit_code=code)
        if self.agent is not None:
            self.agent.stop()
        # Last sweep: anything still parented to us (we are a subreaper) goes too.
        kill_all(psutil.Process().children(recursive=True), timeout=5)
        log.info("far-node stopped")


class DiscoveryAgent(threading.Thread):
    """Registers, heartbeats and prints the status line; never takes the server down."""

    def __init__(self, supervisor: Supervisor):
        super().__init__(name="far-node-discovery", daemon=True)
        self.supervisor = supervisor
        config = supervisor.config
        self.config = config
        self.client = supervisor.client_factory(config.discovery_url) if config.discovery_url else None
        self.registration: Optional[Registration] = None
        self.interval = config.heartbeat_interval or 30.0
        self.failures = 0
        self.tokens: Optional[int] = None
        self.earned: Optional[str] = None
        self.reachability: Optional[dict] = None  # discovery's last dial of this node (None: not probed yet)
        self._halt = threading.Event()

    # -- discovery calls --------------------------------------------------------------------------------------
    def hardware(self, status: dict) -> dict:
        return {
            "gpu": status.get("gpu"),
            "vram_total_gb": round(status["vram_total_gb"], 2) if status.get("vram_total_gb") else None,
            "ram_total_gb": round(psutil.virtual_memory().total / GB, 2),
            "device": status.get("device") or self.config.options.device,
        }

    def register(self, status: dict) -> Registration:
        identity = self.supervisor.identity
        registration = self.client.register(
            identity, wallet_address=self.config.wallet_address, model_id=self.config.model_id,
            start_block=status["start_block"], end_block=status["end_block"], public_name=self.config.public_name,
            hardware=self.hardware(status))
        save_registration(self.config.state_dir, identity.peer_id, {
            "node_id": registration.node_id, "node_token": registration.node_token,
            "discovery_url": self.config.discovery_url, "peer_id": identity.peer_id,
            "model_id": self.config.model_id, "wallet_address": self.config.wallet_address,
            "start_block": registration.start_block, "end_block": registration.end_block,
            "registered_at": time.time(),
        })
        if not self.config.heartbeat_interval:
            self.interval = registration.heartbeat_interval_s
        log.info("registered with discovery", node_id=registration.node_id,
                 blocks=f"{registration.start_block}:{registration.end_block}", url=self.config.discovery_url)
        return registration

    def heartbeat(self, status: dict) -> None:
        state = HEARTBEAT_STATES[status["state"]]
        answer = self.client.heartbeat(self.registration.node_token, state=state,
                                       vram_used_gb=status.get("vram_used_gb"), gpu_temp_c=status.get("gpu_temp_c"))
        self.tokens = answer.get("tokens_served", self.tokens)
        self.earned = answer.get("earned_far", self.earned)
        self.note_reachability(answer.get("reachability"))
        if answer.get("heartbeat_interval_s") and not self.config.heartbeat_interval:
            self.interval = float(answer["heartbeat_interval_s"])

    def note_reachability(self, reach: Optional[dict]) -> None:
        """Log when discovery's verdict changes: an unreachable node serves nobody and earns nothing."""
        before, self.reachability = self.reachability, reach
        if not reach or ((before or {}).get("reachable"), (before or {}).get("via_relay")) == (
                reach.get("reachable"), reach.get("via_relay")):
            return
        if reach.get("reachable"):
            log.info("the swarm can reach this node", addresses=reach.get("addresses"),
                     via_relay=reach.get("via_relay"))
        else:
            log.warning("the swarm CANNOT reach this node: clients cannot open sessions with it, so it serves no "
                        "tokens and earns nothing", error=reach.get("error"), fix=reach.get("hint"),
                        announced=self.config.options.announce_host or self.config.options.host,
                        port=self.config.options.port)

    def reachability_note(self) -> Optional[str]:
        if self.reachability and self.reachability.get("reachable") is False:
            return "UNREACHABLE from the swarm (earning nothing): see `far-node status`"
        if self.reachability and self.reachability.get("via_relay"):
            return f"reachable: via relay {self.reachability['via_relay']}"
        return None

    # -- loop ---------------------------------------------------------------------------------------------
    def print_status(self, status: dict, note: Optional[str] = None) -> None:
        span = (f"{status['start_block']}:{status['end_block']}" if status.get("start_block") is not None
                else str(self.config.options.blocks or "auto"))
        line = status_line(tokens=self.tokens, earned=self.earned, memory=self.supervisor.memory_field(status),
                           blocks=span, state=status.get("state", "STARTING"), note=note,
                           prefix="[Heartbeat]" if self.client else "[Status]")
        out = self.supervisor.out
        out.write(line + "\n")
        out.flush()

    def step(self) -> float:
        """One round; returns how long to wait before the next."""
        status = self.supervisor.server_status()
        if self.client is None:
            self.print_status(status)
            return self.interval
        serving = status.get("start_block") is not None and status.get("state") in HEARTBEAT_STATES
        if not serving:
            if self.registration is None:
                return 0.5  # the server has not chosen/announced its blocks yet
            self.print_status(status, note="server not serving: no heartbeat")
            return self.interval
        if self.registration is not None and (status["start_block"], status["end_block"]) != (
                self.registration.start_block, self.registration.end_block):
            log.info("the server moved to other blocks; registering the new span",
                     blocks=f"{status['start_block']}:{status['end_block']}")
            self.registration = None
        registering = self.registration is None
        try:
            if registering:
                self.registration = self.register(status)
            self.heartbeat(status)
            self.failures = 0
            self.print_status(status, note=self.reachability_note())
            return self.interval
        except NotRegistered as error:
            if registering:  # a refused proof (bad nonce/signature): retry with a fresh challenge, slowly
                return self._failed(error, status, "registration")
            log.warning("discovery no longer knows this node's token; registering again", error=str(error))
            self.registration = None
            self.failures += 1
            return min(self.interval, backoff_delay(self.failures - 1))
        except DiscoveryError as error:
            return self._failed(error, status, "registration" if self.registration is None else "heartbeat")

    def _failed(self, error: DiscoveryError, status: dict, what: str) -> float:
        """Keep serving; retry with backoff (1, 2, 4 ... 60 s, ±20 % jitter so a restarted discovery is not
        hit by every node at once)."""
        delay = backoff_delay(self.failures) * random.uniform(0.8, 1.2)
        self.failures += 1
        kind = "refused" if isinstance(error, DiscoveryRefused) else "unreachable"
        log.warning(f"discovery {kind}: {what} failed; still serving, retrying", error=str(error),
                    retry_in_s=round(delay, 1), failures=self.failures)
        self.print_status(status, note=f"discovery {kind} ({error}), retry in {delay:.0f} s")
        return delay

    def run(self) -> None:
        wait = 0.5
        while not self._halt.wait(wait):
            try:
                wait = self.step()
            except Exception as error:  # never let a bug in reporting stop the supervision
                log.exception("discovery agent error", error=str(error))
                wait = 5.0

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=15)
        if self.client is None:
            return
        if self.registration is not None:
            from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

            from node_server.discovery_client import DiscoveryUnavailable

            try:
                for attempt in Retrying(stop=stop_after_attempt(3), wait=wait_fixed(0.5), reraise=True,
                                        retry=retry_if_exception_type(DiscoveryUnavailable)):
                    with attempt:
                        self.client.unregister(self.registration.node_token)
                log.info("unregistered from discovery", node_id=self.registration.node_id)
            except DiscoveryError as error:
                log.warning("could not unregister (discovery will mark the node offline when heartbeats stop)",
                            error=str(error))
        self.client.close()


def parse_server_command(text: Optional[str]) -> Optional[list[str]]:
    return shlex.split(text) if text else None
