"""A WAN on one machine: hosts in network namespaces whose links have a one-way delay, jitter and a bandwidth
cap, and "home" networks behind a NAT router (outbound connections work, nobody can dial in).

Built on :mod:`infra.netns` (a bridge in the root namespace, one namespace per host). Each host's link is cut in
two so that a userspace *delayer* can sit in the middle of the wire::

    host ns: eth0 ==veth== <tag>a<i>  [delayer: AF_PACKET, frames held d ms]  <tag>b<i> ==veth== <tag>r<i> -- bridge

The delayer (``python -m infra.wanlab delayer``, one process for the whole lab, stopped by PID) reads every
Ethernet frame from one end and writes it to the other once its one-way delay (plus jitter) has passed, in both
directions, keeping each direction's order (TCP sees delay, not reordering). Every protocol is delayed (TCP,
UDP, ICMP, libp2p's dials in either direction) and no address changes, which is why it is a wire and not a
TCP relay: a relay only delays connections made *to* the address it listens on, and libp2p peers dial each
other both ways. The kernel has no ``netem``; ``tbf`` exists, so bandwidth is a token bucket on both ends of
the host's link (egress of ``eth0`` = upload, egress of ``<tag>a<i>`` = download). Offloads (checksum, TSO/GSO,
GRO) are off on every lab interface, so the frames the delayer copies are whole, checksummed and at most one
MTU.

A home network is a router namespace (its WAN side a host link like any other, with the access link's delay)
holding a LAN bridge; home hosts sit on that LAN with private addresses and a default route through the
router, which MASQUERADEs outbound traffic and drops new inbound connections (iptables, in the router's
namespace).

Needs root, ``ip``, ``tc``, ``ethtool`` and ``iptables`` (Debian packages iproute2, ethtool, iptables;
scripts/ensure_debian_tools.sh installs them); :func:`unavailable_reason` says why not when it cannot work.
:meth:`WanLab.close` removes everything it made (delayer, namespaces, links), also after a failure.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from infra.netns import Host, NetnsLab, _free_subnet, _ip
from infra.netns import unavailable_reason as netns_unavailable_reason

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # a frame this socket's own host sent: not one to forward


@dataclass(frozen=True)
class LinkShape:
    """One host link: ``delay_ms`` each way (so a round trip between this host and an undelayed one takes
    2 × delay_ms), ``jitter_ms`` added uniformly in ±jitter per frame (order kept), ``rate_mbit`` cap each way."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_mbit: Optional[float] = None


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=check)


def unavailable_reason() -> Optional[str]:
    """None when the WAN lab can be made here; else why not (a skip reason)."""
    reason = netns_unavailable_reason()
    if reason:
        return reason
    for tool, package in (("tc", "iproute2"), ("ethtool", "ethtool"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian package {package}: scripts/ensure_debian_tools.sh)"
    return None


def _quiet_interface(device: str, netns: Optional[str] = None) -> None:
    """Offloads off (whole, checksummed, MTU-sized frames for the delayer) and no IPv6 chatter."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    _run([*prefix, "ethtool", "-K", device, "tx", "off", "sg", "off", "tso", "off", "gso", "off", "gro", "off"],
         check=False)
    _run([*prefix, "sysctl", "-qw", f"net.ipv6.conf.{device}.disable_ipv6=1"], check=False)


def _shape_bandwidth(device: str, rate_mbit: Optional[float], netns: Optional[str] = None) -> None:
    in_ns = ("-n", netns) if netns else ()
    _run(["tc", *in_ns, "qdisc", "del", "dev", device, "root"], check=False)
    if rate_mbit:
        burst = max(1600, int(rate_mbit * 1e6 / 8 / 250))  # 4 ms of traffic, at least one frame
        _run(["tc", *in_ns, "qdisc", "add", "dev", device, "root", "tbf", "rate", f"{rate_mbit}mbit",
              "burst", str(burst), "latency", "200ms"])


@dataclass
class Home:
    """A NAT'd network: ``router`` is the router namespace's WAN host; ``lan_gateway`` its LAN address."""

    name: str
    router: Host
    lan_subnet: object
    lan_gateway: str
    hosts: list


class WanLab(NetnsLab):
    """Hosts whose links pass through the delayer; :meth:`set_link` changes a link's shape while traffic flows."""

    def __init__(self) -> None:
        super().__init__()
        self.links: dict[str, dict] = {}  # host name -> {"a", "b", "shape"}
        self.homes: dict[str, Home] = {}
        self._dir = Path(tempfile.mkdtemp(prefix=f"fm{self.tag}wan-"))
        self._config = self._dir / "links.json"
        self.delayer: Optional[subprocess.Popen] = None
        self._generation = 0

    def __enter__(self) -> "WanLab":
        super().__enter__()
        _quiet_interface(self.bridge)  # the root namespace's own traffic (the database relay) crosses it too
        return self

    # --- hosts ------------------------------------------------------------------------------------------------
    def add_host(self, name: str, shape: LinkShape = LinkShape()) -> Host:
        index = len(self.hosts)
        address = str(self.subnet.network_address + 10 + index)
        netns = f"fm{self.tag}-{name}"
        a, b, r = (f"fm{self.tag}{kind}{index}" for kind in "abr")
        host = Host(name, netns, address, r)  # cut(host) downs the bridge side, as on a plain lab
        self.hosts[name] = host  # registered first: close() removes whatever part was made
        self.links[name] = {"a": a, "b": b, "shape": shape}
        _ip("netns", "add", netns)
        _ip("link", "add", a, "type", "veth", "peer", "name", f"fm{self.tag}e{index}")
        _ip("link", "set", f"fm{self.tag}e{index}", "netns", netns)
        _ip("link", "add", b, "type", "veth", "peer", "name", r)
        _ip("link", "set", r, "master", self.bridge)
        for device in (a, b, r):
            _quiet_interface(device)
            _ip("link", "set", device, "promisc", "on")
            _ip("link", "set", device, "up")
        in_ns = ("-n", netns)
        _ip(*in_ns, "link", "set", "lo", "up")
        _ip(*in_ns, "link", "set", f"fm{self.tag}e{index}", "name", "eth0")
        _quiet_interface("eth0", netns)
        _ip(*in_ns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip(*in_ns, "link", "set", "eth0", "up")
        self._apply_shape(name)
        return host

    def set_link(self, host: Host, shape: LinkShape) -> None:
        """A new delay/jitter/bandwidth for the host's link, effective for the next frames."""
        self.links[host.name]["shape"] = shape
        self._apply_shape(host.name)

    def _apply_shape(self, name: str) -> None:
        link, host = self.links[name], self.hosts[name]
        _shape_bandwidth("eth0", link["shape"].rate_mbit, host.netns)
        _shape_bandwidth(link["a"], link["shape"].rate_mbit)
        self._reload_delayer()

    # --- the delayer ------------------------------------------------------------------------------------------
    def _reload_delayer(self) -> None:
        self._generation += 1
        config = {"generation": self._generation,
                  "links": [{"a": link["a"], "b": link["b"], "delay_ms": link["shape"].delay_ms,
                             "jitter_ms": link["shape"].jitter_ms} for link in self.links.values()]}
        self._config.write_text(json.dumps(config))
        if self.delayer is None or self.delayer.poll() is not None:
            self.delayer = subprocess.Popen([sys.executable, "-m", "infra.wanlab", "delayer", str(self._config)],
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            cwd=Path(__file__).resolve().parent.parent)
        else:
            os.kill(self.delayer.pid, signal.SIGHUP)
        self._await_delayer(self._generation)

    def _await_delayer(self, generation: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.delayer.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = self.delayer.stdout.readline().decode(errors="replace").strip()
            if not line:
                break  # exited
            seen.append(line)
            if line == f"ready {generation}":
                return
        raise RuntimeError(f"the delayer did not take links generation {generation}: {seen[-5:]}")

    # --- home networks behind NAT -----------------------------------------------------------------------------
    def add_home(self, name: str, shape: LinkShape = LinkShape()) -> Home:
        """A router namespace on the lab (its access link shaped by ``shape``) with an empty LAN behind NAT."""
        router = self.add_host(name, shape)
        lan = _free_subnet()
        while lan.overlaps(self.subnet) or any(lan.overlaps(h.lan_subnet) for h in self.homes.values()):
            lan = _free_subnet()
        gateway = str(lan.network_address + 1)
        home = Home(name, router, lan, gateway, [])
        self.homes[name] = home
        in_ns = ("-n", router.netns)
        _ip(*in_ns, "link", "add", "lan", "type", "bridge")
        _ip(*in_ns, "addr", "add", f"{gateway}/{lan.prefixlen}", "dev", "lan")
        _ip(*in_ns, "link", "set", "lan", "up")
        _quiet_interface("lan", router.netns)

        def nat(*rule: str) -> None:
            _run(["ip", "netns", "exec", router.netns, *rule])

        nat("sysctl", "-qw", "net.ipv4.ip_forward=1")
        nat("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", str(lan), "-o", "eth0", "-j", "MASQUERADE")
        nat("iptables", "-A", "FORWARD", "-i", "eth0", "-o", "lan", "-m", "conntrack", "--ctstate",
            "ESTABLISHED,RELATED", "-j", "ACCEPT")
        nat("iptables", "-A", "FORWARD", "-i", "eth0", "-o", "lan", "-j", "DROP")  # nobody dials in
        return home

    def add_home_host(self, home: Home, name: str) -> Host:
        """A host on the home's LAN: a private address, the router as its default route, no link of its own."""
        index = len(home.hosts)
        address = str(home.lan_subnet.network_address + 10 + index)
        netns = f"fm{self.tag}-{name}"
        inner = f"fm{self.tag}{home.name[:3]}{index}"[:15]
        host = Host(name, netns, address, inner)
        self.hosts[name] = host
        home.hosts.append(host)
        _ip("netns", "add", netns)
        _ip("link", "add", inner, "type", "veth", "peer", "name", f"{inner}x"[:15])
        _ip("link", "set", inner, "netns", home.router.netns)
        _ip("link", "set", f"{inner}x"[:15], "netns", netns)
        router_ns = ("-n", home.router.netns)
        _ip(*router_ns, "link", "set", inner, "master", "lan")
        _quiet_interface(inner, home.router.netns)
        _ip(*router_ns, "link", "set", inner, "up")
        in_ns = ("-n", netns)
        _ip(*in_ns, "link", "set", "lo", "up")
        _ip(*in_ns, "link", "set", f"{inner}x"[:15], "name", "eth0")
        _quiet_interface("eth0", netns)
        _ip(*in_ns, "addr", "add", f"{address}/{home.lan_subnet.prefixlen}", "dev", "eth0")
        _ip(*in_ns, "link", "set", "eth0", "up")
        _ip(*in_ns, "route", "add", "default", "via", home.lan_gateway)
        return host

    def cut(self, host: Host) -> None:
        if host.name in self.links:
            _ip("link", "set", host.veth, "down")
        else:  # a home host: its LAN port on the router
            home = next(h for h in self.homes.values() if host in h.hosts)
            _ip("-n", home.router.netns, "link", "set", host.veth, "down")

    def restore(self, host: Host) -> None:
        if host.name in self.links:
            _ip("link", "set", host.veth, "up")
        else:
            home = next(h for h in self.homes.values() if host in h.hosts)
            _ip("-n", home.router.netns, "link", "set", host.veth, "up")

    def namespaces(self) -> list[str]:
        """This lab's namespaces that exist now (for the tests' clean-up check)."""
        listed = _ip("netns", "list", check=False).stdout.split()
        return [name for name in listed if name.startswith(f"fm{self.tag}-")]

    def close(self) -> None:
        if self.delayer is not None:
            if self.delayer.poll() is None:
                self.delayer.terminate()
                try:
                    self.delayer.wait(10)
                except subprocess.TimeoutExpired:
                    self.delayer.kill()
                    self.delayer.wait(10)
            self.delayer.stdout.close()
            self.delayer = None
        for link in self.links.values():
            _ip("link", "del", link["a"], check=False)
            _ip("link", "del", link["b"], check=False)
        self.links.clear()
        # home hosts' veths live in the router namespace and go with it
        routers = [home.router.netns for home in self.homes.values()]
        for host in list(self.hosts.values()):
            if host.netns not in routers:
                _ip("netns", "del", host.netns, check=False)
        for netns in routers:
            _ip("netns", "del", netns, check=False)
        self.hosts.clear()
        self.homes.clear()
        if self._made_bridge:
            _ip("link", "del", self.bridge, check=False)
            self._made_bridge = False
        if self.relay is not None:
            self.relay.stop()
            self.relay = None
        shutil.rmtree(self._dir, ignore_errors=True)


# --- the delayer process --------------------------------------------------------------------------------------
class _Direction:
    """Frames read from ``source`` wait in order until due, then go out of ``target``."""

    def __init__(self, source: socket.socket, target: socket.socket):
        self.source, self.target = source, target
        self.delay_s = self.jitter_s = 0.0
        self.queue: deque = deque()
        self.last_due = 0.0

    def take(self, now: float) -> None:
        for _ in range(256):  # bounded: the other direction gets its turn
            try:
                frame, address = self.source.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # the interface went down (a cut link): nothing to read
            if address[2] == PACKET_OUTGOING:
                continue
            extra = random.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0
            due = max(now + max(0.0, self.delay_s + extra), self.last_due)
            self.last_due = due
            self.queue.append((due, frame))

    def send_due(self, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            _, frame = self.queue.popleft()
            try:
                self.target.send(frame)
            except OSError:
                pass  # link down or queue full: the frame is lost, as on a real wire


def _packet_socket(device: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.bind((device, 0))
    sock.setblocking(False)
    return sock


def run_delayer(config_path: str) -> None:
    """Forward frames between each link's two ends with its delay; SIGHUP re-reads the links; SIGTERM stops."""
    sockets: dict[str, socket.socket] = {}
    directions: dict[tuple[str, str], _Direction] = {}
    poller = select.epoll()
    by_fd: dict[int, _Direction] = {}
    state = {"reload": True, "stop": False}
    signal.signal(signal.SIGHUP, lambda *_: state.update(reload=True))
    signal.signal(signal.SIGTERM, lambda *_: state.update(stop=True))

    def reload() -> None:
        config = json.loads(Path(config_path).read_text())
        for link in config["links"]:
            for device in (link["a"], link["b"]):
                if device not in sockets:
                    sockets[device] = _packet_socket(device)
            for source, target in ((link["a"], link["b"]), (link["b"], link["a"])):
                if (source, target) not in directions:
                    direction = _Direction(sockets[source], sockets[target])
                    directions[(source, target)] = direction
                    by_fd[sockets[source].fileno()] = direction
                    poller.register(sockets[source].fileno(), select.EPOLLIN)
                direction = directions[(source, target)]
                direction.delay_s = link["delay_ms"] / 1000.0
                direction.jitter_s = link["jitter_ms"] / 1000.0
        print(f"ready {config['generation']}", flush=True)

    while not state["stop"]:
        if state["reload"]:
            state["reload"] = False
            reload()
        now = time.monotonic()
        heads = [d.queue[0][0] for d in directions.values() if d.queue]
        timeout = min(0.2, max(0.0, min(heads) - now)) if heads else 0.2
        try:
            events = poller.poll(timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for fd, _ in events:
            by_fd[fd].take(now)
        now = time.monotonic()
        for direction in directions.values():
            direction.send_due(now)


# --- small TCP tools the lab's tests run inside namespaces -----------------------------------------------------
def run_echo(port: int) -> None:
    """Echo server: each line back, prefixed by the address the connection came from; ``SINK n`` reads n bytes
    and answers ``OK``."""
    import socketserver

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                if line.startswith(b"SINK "):
                    remaining = int(line.split()[1])
                    while remaining > 0:
                        chunk = self.rfile.read(min(65536, remaining))
                        if not chunk:
                            return
                        remaining -= len(chunk)
                    self.wfile.write(b"OK\n")
                else:
                    self.wfile.write(f"{self.client_address[0]} ".encode() + line)
                self.wfile.flush()

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer(("0.0.0.0", port), Handler) as server:
        print("listening", flush=True)
        server.serve_forever()


def run_probe(host: str, port: int, count: int, send_bytes: int, timeout: float) -> dict:
    """Connect, time ``count`` one-line round trips (after one warm-up), optionally upload ``send_bytes``."""
    started = time.monotonic()
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as error:
        return {"connected": False, "error": f"{type(error).__name__}: {error}",
                "waited_s": time.monotonic() - started}
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = sock.makefile("rb")
    rtts, seen_as = [], None
    for index in range(count + 1):
        sent = time.monotonic()
        sock.sendall(b"ping\n")
        answer = reader.readline()
        seen_as = answer.split()[0].decode() if answer else None
        if index:
            rtts.append((time.monotonic() - sent) * 1000)
    upload = None
    if send_bytes:
        sent = time.monotonic()
        sock.sendall(f"SINK {send_bytes}\n".encode())
        sock.sendall(b"x" * send_bytes)
        reader.readline()
        upload = send_bytes * 8 / (time.monotonic() - sent) / 1e6
    sock.close()
    return {"connected": True, "rtt_ms": rtts, "seen_as": seen_as, "upload_mbit": upload}


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m infra.wanlab")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("delayer").add_argument("config")
    sub.add_parser("echo").add_argument("--port", type=int, required=True)
    probe = sub.add_parser("probe")
    probe.add_argument("--host", required=True)
    probe.add_argument("--port", type=int, required=True)
    probe.add_argument("--count", type=int, default=20)
    probe.add_argument("--send-bytes", type=int, default=0)
    probe.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.command == "delayer":
        run_delayer(args.config)
    elif args.command == "echo":
        run_echo(args.port)
    else:
        print(json.dumps(run_probe(args.host, args.port, args.count, args.send_bytes, args.timeout)))


if __name__ == "__main__":
    main()
