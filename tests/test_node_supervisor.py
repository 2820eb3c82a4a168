"""``far-node run`` supervision and the discovery agent, with a stand-in server child (fast, no Petals):
restart with backoff after a crash, serving on while discovery is down, re-registration after a 401, a clean
stop that unregisters and leaves no process behind, and ``far-node status``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pexpect
import psutil

from infra.processes import ManagedProcess, wait_until
from tests.fixtures.swarm import free_port
from tests.node_support import FakeDiscovery, fake_server_command

WALLET = "0x52908400098527886e0f7030069857d2e4169ee7"
BOOTSTRAP = "/ip4/127.0.0.1/tcp/1/p2p/QmXWGd5Wsq8Mu6vVnB5C6h6c4MfJZN2NYWF5bhLRSN8Bdv"


def start_node(tmp_path, discovery_url: str, *, mode: str = "ok", extra: tuple = ()) -> ManagedProcess:
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"), FAR_MESH_STATE_DIR=str(tmp_path / "state"))
    argv = [sys.executable, "-m", "node_server.cli", "run", "--model", str(tmp_path), "--blocks", "1:3",
            "--initial-peers", BOOTSTRAP, "--wallet", WALLET, "--discovery-url", discovery_url,
            "--heartbeat-interval", "0.5", "--server-command", fake_server_command(mode), *extra]
    return ManagedProcess("far-node", argv, log_path=tmp_path / "node.log", env=env).start()


def stop_and_check_tree(node: ManagedProcess, signum: int = signal.SIGTERM) -> list[int]:
    """Signal the supervisor; it must exit 0 by itself with its whole tree gone. Returns that tree's pids."""
    tree = node.tree()
    assert len(tree) >= 3, "supervisor, server child and its grandchild"
    node.popen.send_signal(signum)
    assert node.popen.wait(timeout=30) == 0, node.tail()
    gone, alive = psutil.wait_procs(tree, timeout=5)
    assert not alive, f"left behind: {alive}"
    return [p.pid for p in tree]


def test_crash_restart_heartbeats_and_clean_stop(tmp_path):
    with FakeDiscovery() as discovery:
        node = start_node(tmp_path, discovery.url, mode="crash-once")
        try:
            wait_until(lambda: any(n.get("heartbeats", 0) >= 3 for n in discovery.nodes.values()), timeout=60,
                       what="registration and 3 heartbeats", process=node)
            log = node.tail(200)
            assert "Petals server exited with code 3" in log and "restarting in 1 s" in log
            assert "simulated crash" in log  # the child's last output is shown with the reason
            assert "[Heartbeat] Tokens: 0 | Earned: 0.0000 FAR | RAM: " in log and "Blocks 1:3 ONLINE" in log
            (record,) = discovery.nodes.values()
            assert (record["start_block"], record["end_block"], record["state"]) == (1, 3, "online")
            assert record["hardware"]["device"] == "cpu" and record["hardware"]["ram_total_gb"] > 0
            assert record["wallet_address"] == "0x52908400098527886E0F7030069857D2E4169EE7"
            # the crashed run's grandchild (a stand-in for an orphaned p2pd) was killed before the restart
            crashed_grandchild = int(log.split("fake server run 1 pid ")[1].split("grandchild ")[1].split()[0])
            assert not psutil.pid_exists(crashed_grandchild) or \
                psutil.Process(crashed_grandchild).status() == psutil.STATUS_ZOMBIE
            stop_and_check_tree(node)
            assert record["state"] == "OFFLINE" and record.get("unregistered")
            assert "unregistered from discovery" in node.tail(50)
        finally:
            node.stop()


def test_keeps_serving_while_discovery_is_down_then_registers(tmp_path):
    port = free_port()
    node = start_node(tmp_path, f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: node.tail(100).count("discovery unreachable") >= 2, timeout=30,
                   what="two failed registration attempts", process=node)
        assert "Blocks 1:3 ONLINE | discovery unreachable" in node.tail(100)
        with FakeDiscovery(port=port) as discovery:
            wait_until(lambda: any(n.get("heartbeats", 0) >= 1 for n in discovery.nodes.values()), timeout=60,
                       what="registration once discovery is up", process=node)
            # discovery forgets the token (e.g. restarted without its database): 401 -> register again
            discovery.tokens.clear()
            wait_until(lambda: next(iter(discovery.nodes.values())).get("registrations", 0) >= 2, timeout=30,
                       what="re-registration after a 401", process=node)
            assert "registering again" in node.tail(100)
            stop_and_check_tree(node)
    finally:
        node.stop()


def test_status_command(tmp_path):
    with FakeDiscovery() as discovery:
        node = start_node(tmp_path, discovery.url, extra=("--torch-threads", "3"))
        try:
            wait_until(lambda: any(n.get("heartbeats", 0) >= 1 for n in discovery.nodes.values()), timeout=60,
                       what="a heartbeat", process=node)
            # the server is started with the flags' options (here: its torch threads)
            options = [json.loads(path.read_text()) for path in (tmp_path / "state").rglob("*.options.json")]
            assert [o["torch_threads"] for o in options] == [3], options
            env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"), FAR_MESH_STATE_DIR=str(tmp_path / "state"))
            result = subprocess.run([sys.executable, "-m", "node_server.cli", "status"], env=env, text=True,
                                    capture_output=True, timeout=60)
            assert result.returncode == 0, result.stderr
            assert "node-1" in result.stdout and "blocks 1:3" in result.stdout and "earned       0.0000 FAR" in \
                result.stdout and "last payout  none yet" in result.stdout, result.stdout
            stop_and_check_tree(node, signal.SIGINT)  # Ctrl-C behaves like SIGTERM
            result = subprocess.run([sys.executable, "-m", "node_server.cli", "status"], env=env, text=True,
                                    capture_output=True, timeout=60)
            assert "state        OFFLINE" in result.stdout, result.stdout
        finally:
            node.stop()


def test_run_flag_errors_name_the_flag(tmp_path):
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"), FAR_MESH_STATE_DIR=str(tmp_path / "state"),
               FAR_MESH_DHT_BOOTSTRAP="")
    base = [sys.executable, "-m", "node_server.cli", "run", "--model", str(tmp_path)]
    cases = [
        ([], "--initial-peers"),
        (["--initial-peers", BOOTSTRAP], "--blocks"),
        (["--initial-peers", BOOTSTRAP, "--blocks", "0:2", "--discovery-url", "http://127.0.0.1:9"], "--wallet"),
        (["--initial-peers", BOOTSTRAP, "--blocks", "0:2", "--no-register", "--port", "70000"], "--port"),
        (["--config", str(tmp_path / "missing.toml")], "--config"),
        # peers dial <public address>:<port>: an announced address needs a port known before the start
        (["--initial-peers", BOOTSTRAP, "--blocks", "0:2", "--no-register", "--public-address", "203.0.113.5"],
         "--public-address"),
    ]
    for args, flag in cases:
        result = subprocess.run(base + args, env=env, text=True, capture_output=True, timeout=60)
        assert result.returncode == 2 and f"far-node: {flag}: " in result.stderr, (args, result.stderr)


def test_server_stops_when_the_supervisor_is_killed(tmp_path):
    """SIGKILL of the supervisor (no chance to clean up): the server child gets SIGTERM from the kernel
    (PR_SET_PDEATHSIG) and stops its own children, so nothing is orphaned."""
    with FakeDiscovery() as discovery:
        node = start_node(tmp_path, discovery.url)
        try:
            wait_until(lambda: any(n.get("heartbeats", 0) >= 1 for n in discovery.nodes.values()), timeout=60,
                       what="a heartbeat (the server is up)", process=node)
            children = node.tree()[1:]
            assert len(children) >= 2, "server child and its grandchild"
            node.popen.kill()
            node.popen.wait(timeout=10)
            _, alive = psutil.wait_procs(children, timeout=10)
            assert not alive, f"orphans: {alive}"
        finally:
            node.stop()


def test_ctrl_c_in_a_terminal_stops_in_order(tmp_path):
    """In a terminal, Ctrl-C signals the whole foreground group; the server has its own session, so only the
    supervisor gets SIGINT, and the server is stopped by it (SIGTERM: it announces OFFLINE), then unregistered."""
    with FakeDiscovery() as discovery:
        env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"), FAR_MESH_STATE_DIR=str(tmp_path / "state"))
        child = pexpect.spawn(sys.executable, ["-m", "node_server.cli", "run", "--model", str(tmp_path), "--blocks",
                                               "1:3", "--initial-peers", BOOTSTRAP, "--wallet", WALLET,
                                               "--discovery-url", discovery.url, "--heartbeat-interval", "0.5",
                                               "--server-command", fake_server_command()],
                              env=env, encoding="utf-8", timeout=60, dimensions=(40, 200))
        try:
            child.expect(r"\[Heartbeat\] Tokens: 0 \| Earned: 0.0000 FAR \| RAM: [0-9.]+/[0-9.]+ GB \| Blocks 1:3 ONLINE")
            tree = psutil.Process(child.pid).children(recursive=True)
            child.sendintr()
            child.expect("far-node stopped")
            child.expect(pexpect.EOF)
        finally:
            child.close()
        assert child.exitstatus == 0
        _, alive = psutil.wait_procs(tree, timeout=5)
        assert not alive
        (record,) = discovery.nodes.values()
        assert record.get("unregistered")
        status = (tmp_path / "state" / "node" / "run").glob("*.status.json")
        assert '"state": "OFFLINE"' in next(status).read_text()  # the server handled SIGTERM, not a raw SIGINT
