"""Relays without a flag, the pure parts: which p2pd flags a peer gets, which relays a NAT'd server uses, when a
server checks its reachability, and how a verdict reached through a relay is worded (the lab test,
tests/test_wan_nat.py, runs it for real)."""

from __future__ import annotations

from services.common import p2p_relay
from services.common.p2p_relay import RelayLimits, p2pd_relay_flags, trusted_relays
from services.discovery.reachability import Reachability, describe, relay_of

RELAY = "12D3KooWRelayRelayRelay"
NODE = "12D3KooWNodeNodeNode"
CIRCUIT = f"/ip4/11.200.1.10/tcp/31337/p2p/{RELAY}/p2p-circuit"


def test_relay_service_is_bounded_and_auto_relay_uses_static_relays():
    limits = RelayLimits(max_reservations=8, max_circuits=2, time_limit_s=600, data_limit_mb=64)
    flags = p2pd_relay_flags(limits, relay=True, auto_relay=True, has_trusted_relays=True)
    assert flags == {"relayService": 1, "relayMaxReservations": 8, "relayMaxCircuits": 2, "relayTimeLimit": "600s",
                     "relayDataLimit": 64 << 20, "relayDiscovery": 0}
    # no relay at all: nothing added; auto-relay with no relay known: switched off (p2pd refuses to start)
    assert p2pd_relay_flags(limits, relay=False, auto_relay=False, has_trusted_relays=False) == {}
    assert p2pd_relay_flags(limits, relay=False, auto_relay=True, has_trusted_relays=False) == {"autoRelay": 0}
    assert p2pd_relay_flags(RelayLimits(max_reservations=0), relay=True, auto_relay=False,
                            has_trusted_relays=False)["relayService"] == 0


def test_install_adds_the_flags_to_every_p2pd_command_line():
    from hivemind.p2p import p2p_daemon

    before = p2p_daemon.P2P._make_process_args
    try:
        p2p_relay.install(RelayLimits(max_reservations=5, max_circuits=3, time_limit_s=60, data_limit_mb=1))
        p2p_relay.install(RelayLimits(max_reservations=5, max_circuits=3, time_limit_s=60, data_limit_mb=1))  # again
        argv = p2p_daemon.P2P._make_process_args("p2pd", relay=True, autoRelay=True, trustedRelays="/ip4/x")
        assert argv.count("-relayMaxCircuits=3") == 1 and "-relayDiscovery=0" in argv, argv
        assert "-relayTimeLimit=60s" in argv and "-relayMaxReservations=5" in argv
        probe = p2p_daemon.P2P._make_process_args("p2pd", relay=False, autoRelay=False, trustedRelays="/ip4/x")
        assert not any(arg.startswith(("-trustedRelays", "-relayMax")) for arg in probe), probe
    finally:
        p2p_daemon.P2P._make_process_args = before


def test_trusted_relays_are_the_bootstrap_peers_and_the_configured_extras():
    boot = [f"/ip4/11.200.1.10/tcp/31337/p2p/{RELAY}"]
    assert trusted_relays(boot, extra="") == boot
    assert trusted_relays(boot, extra=f" /ip4/11.200.1.11/tcp/31330/p2p/X, {boot[0]}") == [
        boot[0], "/ip4/11.200.1.11/tcp/31330/p2p/X"]


def test_a_server_checks_its_reachability_unless_it_is_a_local_swarm():
    from node_server.petals_server import ServerOptions, relay_kwargs

    peers = (f"/ip4/11.200.1.10/tcp/31337/p2p/{RELAY}",)
    local = relay_kwargs(ServerOptions(model_path="m", model_id="m", initial_peers=peers))
    assert local == {"reachable_via_relay": False, "use_relay": True, "use_auto_relay": False}
    public = relay_kwargs(ServerOptions(model_path="m", model_id="m", initial_peers=peers, host="0.0.0.0",
                                        port=31330))
    assert public["reachable_via_relay"] is None  # Petals asks the peers it knows to dial it
    assert public["use_auto_relay"] and public["trusted_relays"][0] == peers[0]


def test_a_verdict_through_a_relay_names_the_relay():
    assert relay_of([f"{CIRCUIT}/p2p/{NODE}"]) == RELAY
    assert relay_of([CIRCUIT, "/ip4/11.200.1.12/tcp/31330"]) is None  # a direct connection too
    assert relay_of([]) is None
    relayed = Reachability(True, 1.0, None, [CIRCUIT]).to_dict()
    assert relayed["via_relay"] == RELAY and describe(relayed) == f"via relay {RELAY}"
    direct = Reachability(True, 1.0, None, ["/ip4/11.200.1.12/tcp/31330"]).to_dict()
    assert direct["via_relay"] is None and describe(direct) == "yes (/ip4/11.200.1.12/tcp/31330)"
    assert describe(Reachability(False, 1.0, "no answer", []).to_dict()) == "NO: no answer"
    assert describe(None) == "- (not checked yet)"
