"""Several "hosts" on one machine: Linux network namespaces on a bridge, each with its own 10.x address.

Used by the multi-host test (tests/test_multihost.py, ``make multihost``): every part of the mesh runs in a
namespace of its own with ``ip netns exec``, so nothing can reach another part through 127.0.0.1 and every
address the parts announce must be one a real operator would configure. The root namespace holds the bridge
address (``.1``) and plays the database server: PostgreSQL and Redis listen on loopback only here, so a small
TCP relay forwards the bridge address's ports to them (a real deployment points ``POSTGRES_URL`` at its
database server's private address instead).

Needs root and ``ip`` (iproute2); :func:`unavailable_reason` says why not when it cannot work. Everything made
is removed by :meth:`NetnsLab.close` (namespaces, bridge, veth pairs, relay), also after a failure.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import shutil
import subprocess
import threading
from dataclasses import dataclass
from typing import Optional, Sequence


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable_reason() -> Optional[str]:
    """None when namespaces, a bridge and veth pairs can be made here; else why not (a skip reason)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, e.g. in the CI container)"
    name = f"fmprobe{secrets.token_hex(3)}"
    try:
        made = _ip("netns", "add", name, check=False)
        if made.returncode != 0:
            return f"cannot create a network namespace: {made.stderr.strip()}"
        bridge = _ip("link", "add", name[:15], "type", "bridge", check=False)
        if bridge.returncode != 0:
            return f"cannot create a bridge interface: {bridge.stderr.strip()}"
        _ip("link", "del", name[:15], check=False)
        return None
    finally:
        _ip("netns", "del", name, check=False)


def _free_subnet(first_octet: int = 10) -> ipaddress.IPv4Network:
    """A /24 in <first_octet>.200-249.x.0 that no route of this machine covers."""
    used = []
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        try:
            used.append(ipaddress.ip_network(word if word != "default" else "0.0.0.0/32", strict=False))
        except ValueError:
            continue
    for _ in range(64):
        net = ipaddress.ip_network(f"{first_octet}.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}.0/24")
        if not any(net.overlaps(other) for other in used if other.prefixlen > 0):
            return net
    raise RuntimeError("no free 10.x /24 for the test network")


@dataclass
class Host:
    name: str
    netns: str
    address: str  # its own address on the bridge
    veth: str  # the root-side end of its veth pair: `ip link set <veth> down` cuts its link

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run in this host's namespace (``ip netns exec`` execs it: the PID is the command's own)."""
        return ["ip", "netns", "exec", self.netns, *argv]


class TcpRelay:
    """Forwards ``listen_host:port`` to ``target_host:target_port`` (asyncio, in a thread of its own)."""

    def __init__(self, routes: dict[tuple[str, int], tuple[str, int]]):
        self.routes = routes
        self.loop = asyncio.new_event_loop()
        self._servers: list = []
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="netns-relay", daemon=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _handler(self, target: tuple[str, int]):
        async def handle(reader, writer):
            try:
                up_reader, up_writer = await asyncio.open_connection(*target)
            except OSError:
                writer.close()
                return
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        return handle

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            for (host, port), target in self.routes.items():
                self._servers.append(self.loop.run_until_complete(
                    asyncio.start_server(self._handler(target), host, port, reuse_address=True)))
        except BaseException as error:  # noqa: BLE001 - reported by start()
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        for server in self._servers:
            server.close()
        # close the connections still open (asyncio keeps them as tasks)
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def start(self) -> "TcpRelay":
        self.thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError(f"relay could not listen: {self._error}")
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


class NetnsLab:
    """A bridge in the root namespace (address ``.1``) and one namespace + veth pair per host.

    Names carry a random tag (``fm<tag>...``), so parallel runs never collide; :meth:`close` removes all of it.
    """

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.subnet = _free_subnet()
        self.bridge = f"fm{self.tag}br"
        self.gateway = str(self.subnet.network_address + 1)
        self.hosts: dict[str, Host] = {}
        self.relay: Optional[TcpRelay] = None
        self._made_bridge = False

    def __enter__(self) -> "NetnsLab":
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made_bridge = True
            _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_host(self, name: str) -> Host:
        """A new namespace on the bridge with the next free address (``.10`` upwards)."""
        index = len(self.hosts)
        address = str(self.subnet.network_address + 10 + index)
        netns, veth, peer = f"fm{self.tag}-{name}", f"fm{self.tag}h{index}", f"fm{self.tag}n{index}"
        host = Host(name, netns, address, veth)
        self.hosts[name] = host  # registered first: close() removes whatever part was made
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", netns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        in_ns = ("-n", netns)
        _ip(*in_ns, "link", "set", "lo", "up")
        _ip(*in_ns, "link", "set", peer, "name", "eth0")
        _ip(*in_ns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip(*in_ns, "link", "set", "eth0", "up")
        return host

    def cut(self, host: Host) -> None:
        """The host's link goes down: its packets are dropped, its open connections hang (a cable pulled)."""
        _ip("link", "set", host.veth, "down")

    def restore(self, host: Host) -> None:
        _ip("link", "set", host.veth, "up")

    def relay_to_root(self, targets: dict[int, tuple[str, int]]) -> None:
        """Listen on the bridge address at each port and forward to ``targets[port]`` (e.g. 127.0.0.1:5432)."""
        self.relay = TcpRelay({(self.gateway, port): target for port, target in targets.items()}).start()

    def close(self) -> None:
        if self.relay is not None:
            self.relay.stop()
            self.relay = None
        for host in self.hosts.values():
            _ip("link", "del", host.veth, check=False)  # removes both ends
            _ip("netns", "del", host.netns, check=False)
        self.hosts.clear()
        if self._made_bridge:
            _ip("link", "del", self.bridge, check=False)
            self._made_bridge = False
