"""The WAN lab (infra/wanlab.py) does what it claims: a link's one-way delay shows in a TCP round trip, its
bandwidth cap holds, and a host behind the NAT router can connect out but cannot be dialled.

Every namespace, link and process the test makes is removed by the test (the lab by name, processes by PID);
the last check proves it. Skips with the reason where the lab cannot be made (not root, missing tools).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from infra.wanlab import LinkShape, WanLab, unavailable_reason

ECHO_PORT = 7000


@pytest.fixture
def lab():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"the WAN lab needs network namespaces and its tools: {reason}")
    made = WanLab()
    started: list[subprocess.Popen] = []
    made.started = started
    try:
        with made:
            yield made
    finally:
        for process in started:  # by PID, before the namespaces go
            process.kill()
            process.wait(10)
            process.stdout.close()


def _echo(lab, host) -> None:
    process = subprocess.Popen(host.argv([sys.executable, "-m", "infra.wanlab", "echo", "--port", str(ECHO_PORT)]),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    lab.started.append(process)
    assert process.stdout.readline().strip() == b"listening"


def _probe(host, target: str, *, count: int = 20, send_bytes: int = 0, timeout: float = 5.0) -> dict:
    argv = [sys.executable, "-m", "infra.wanlab", "probe", "--host", target, "--port", str(ECHO_PORT),
            "--count", str(count), "--send-bytes", str(send_bytes), "--timeout", str(timeout)]
    done = subprocess.run(host.argv(argv), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_delay_bandwidth_and_nat(lab):
    near = lab.add_host("near")
    far = lab.add_host("far", LinkShape(delay_ms=25))
    home = lab.add_home("home", LinkShape(delay_ms=5))
    pc = lab.add_home_host(home, "pc")
    _echo(lab, near)
    _echo(lab, pc)

    # --- delay: 25 ms each way on far's link, none on near's: a TCP round trip takes 50 ms --------------------
    delayed = _probe(far, near.address)
    assert 45 <= statistics.median(delayed["rtt_ms"]) <= 55, delayed["rtt_ms"]
    assert max(delayed["rtt_ms"]) < 70, delayed["rtt_ms"]
    undelayed = _probe(pc, near.address, count=10)  # through the router's 5 ms link only
    assert 9 <= statistics.median(undelayed["rtt_ms"]) <= 15, undelayed

    # --- jitter keeps order and spreads the round trips around the delay -------------------------------------
    lab.set_link(far, LinkShape(delay_ms=25, jitter_ms=5))
    jittered = _probe(far, near.address, count=30)["rtt_ms"]
    assert 40 <= statistics.median(jittered) <= 60 and max(jittered) - min(jittered) > 2, jittered

    # --- bandwidth: a 16 Mbit/s cap on far's link (no delay) caps an upload ------------------------------------
    lab.set_link(far, LinkShape(rate_mbit=16))
    upload = _probe(far, near.address, count=3, send_bytes=2_000_000)["upload_mbit"]
    assert 16 * 0.6 <= upload <= 16 * 1.1, upload

    # --- NAT: the home pc connects out (seen as its router's address), nobody connects in -----------------------
    out = _probe(pc, near.address, count=5)
    assert out["connected"] and out["seen_as"] == home.router.address, out
    subprocess.run(["ip", "-n", near.netns, "route", "add", str(home.lan_subnet), "via", home.router.address],
                   check=True, timeout=30)  # even one who knows the home's LAN and routes to it...
    inbound = _probe(near, pc.address, count=1, timeout=3)
    assert not inbound["connected"] and inbound["waited_s"] >= 2.5, inbound  # ...is dropped by the router
    at_router = _probe(near, home.router.address, count=1, timeout=3)
    assert not at_router["connected"], at_router  # and the router forwards no port

    # --- clean-up: everything this lab made goes ---------------------------------------------------------------
    delayer = lab.delayer
    for process in lab.started:
        process.kill()
        process.wait(10)
    assert set(lab.namespaces()) == {f"fm{lab.tag}-{name}" for name in ("near", "far", "home", "pc")}
    lab.close()
    assert lab.namespaces() == []
    assert delayer.poll() is not None
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=30).stdout
    assert f"fm{lab.tag}" not in links
