"""Provider node, pure parts: validation, config file, identity file, status line, discovery client errors."""

from __future__ import annotations

import stat

import httpx
import pytest

from node_server import keys, validation
from node_server.agent import backoff_delay, describe_exit, status_line
from node_server.config import NodeConfig, default_config_path, default_state_dir, load_config, save_config
from node_server.discovery_client import DiscoveryClient, DiscoveryRefused, DiscoveryUnavailable, NotRegistered
from services.common.money import format_far_truncated as format_far

CHECKSUMMED = "0x52908400098527886E0F7030069857D2E4169EE7"  # EIP-55 test vector


def test_wallet_validation_and_checksum():
    assert validation.parse_wallet(CHECKSUMMED.lower()) == CHECKSUMMED
    assert validation.parse_wallet(CHECKSUMMED) == CHECKSUMMED
    for bad, words in [("", "required"), ("52908400098527886E0F7030069857D2E4169EE7", "start with 0x"),
                       ("0x1234", "40 hex digits"), ("0x" + "g" * 40, "40 hex digits"), ("0x" + "0" * 40, "zero"),
                       (CHECKSUMMED[:-1] + "e", "checksum")]:
        with pytest.raises(ValueError, match=words):
            validation.parse_wallet(bad)


def test_port_blocks_and_other_answers():
    assert validation.parse_port("31330") == 31330
    for bad in ("0", "65536", "http", "-1"):
        with pytest.raises(ValueError):
            validation.parse_port(bad)
    assert validation.parse_blocks("auto") == "auto" and validation.parse_blocks(" 0 : 2 ", 4) == "0:2"
    with pytest.raises(ValueError, match="goes past.*blocks 0:4"):
        validation.parse_blocks("2:6", 4)
    with pytest.raises(ValueError, match="empty"):
        validation.parse_blocks("2:2", 4)
    with pytest.raises(ValueError, match="START:END"):
        validation.parse_blocks("first two")
    assert validation.parse_memory_limit("auto") is None
    assert validation.parse_memory_limit("20GB", 24.0) == 20.0
    with pytest.raises(ValueError, match="more than this device"):
        validation.parse_memory_limit("30", 24.0)
    assert validation.parse_device("gpu") == "cuda" and validation.parse_device("cpu", ["cpu"]) == "cpu"
    with pytest.raises(ValueError, match="not available"):
        validation.parse_device("cuda:1", ["cuda:0", "cpu"])
    with pytest.raises(ValueError, match="not supported on CPU"):
        validation.parse_dtype("fp16", "cpu")
    assert validation.parse_dtype("bf16", "cuda:0") == "bfloat16"
    assert validation.parse_address("127.0.0.1") == "127.0.0.1" and validation.parse_address("node.example.org")
    with pytest.raises(ValueError):
        validation.parse_address("not an address!")
    with pytest.raises(ValueError, match="multiaddr"):
        validation.parse_initial_peers("127.0.0.1:31337")


def test_config_round_trip_mode_600_and_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = default_config_path()
    assert path == tmp_path / "xdg" / "far-mesh" / "node.toml"
    config = NodeConfig(wallet_address=CHECKSUMMED, model="/models/x", model_id="org/x \"quoted\"", blocks="0:2",
                        public_address="127.0.0.1", port=31331, memory_limit_gb=12.5,
                        initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmA"], identity_path="/k")
    save_config(config, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_config(path) == config
    path.write_text(path.read_text() + "unknown_key = 1\n")
    with pytest.raises(ValueError, match="unknown keys unknown_key"):
        load_config(path)


def test_node_state_lives_in_the_users_state_dir(tmp_path, monkeypatch):
    """The identity key is the provider's: in $XDG_STATE_HOME (not in a checkout or an installed package), unless
    FAR_MESH_STATE_DIR gives this node a folder of its own."""
    monkeypatch.delenv("FAR_MESH_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state-home"))
    monkeypatch.setattr("services.common.config.PROJECT_ROOT", tmp_path / "checkout")
    assert default_state_dir() == tmp_path / "state-home" / "far-mesh" / "node"
    legacy = tmp_path / "checkout" / ".far-mesh" / "node"  # set up by an older version: its identity is kept
    legacy.mkdir(parents=True)
    (legacy / "identity.key").write_bytes(b"x")
    assert default_state_dir() == legacy
    monkeypatch.setenv("FAR_MESH_STATE_DIR", str(tmp_path / "mine"))
    assert default_state_dir() == tmp_path / "mine" / "node"


def test_light_identity_matches_hivemind_format(tmp_path):
    from services.common.identity import create_identity, load_identity

    ours, theirs = tmp_path / "ours.key", tmp_path / "theirs.key"
    assert keys.ensure_identity(ours) and not keys.ensure_identity(ours)  # created once, then reused
    create_identity(theirs)
    for path in (ours, theirs):
        a, b = keys.load_identity(path), load_identity(path)
        assert (a.peer_id, a.public_key) == (b.peer_id, b.public_key)
    assert stat.S_IMODE(ours.stat().st_mode) == 0o400


def test_status_line_and_helpers():
    line = status_line(tokens=1234, earned="0.123456789", memory="VRAM: 22.5/24.0 GB", blocks="0:16", state="ONLINE")
    assert line == "[Heartbeat] Tokens: 1234 | Earned: 0.1234 FAR | VRAM: 22.5/24.0 GB | Blocks 0:16 ONLINE"
    assert status_line(tokens=None, earned=None, memory="RAM: 0.6/23.4 GB", blocks="auto", state="STARTING",
                       prefix="[Status]") == "[Status] RAM: 0.6/23.4 GB | Blocks auto STARTING"
    assert format_far("0.00009") == "0.0000" and format_far("12") == "12.0000"
    assert [backoff_delay(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert describe_exit(-9) == "was killed by SIGKILL" and describe_exit(3) == "exited with code 3"


def test_discovery_client_maps_errors():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/nodes/heartbeat":
            return httpx.Response(401, json={"error": {"code": "invalid_token", "message": "register again"}})
        if request.url.path == "/nodes/register":
            return httpx.Response(422, json={"error": {"code": "invalid_span", "message": "past the end"}})
        return httpx.Response(503, json={"error": {"code": "unavailable", "message": "db down"}})

    client = DiscoveryClient("http://discovery.invalid", transport=httpx.MockTransport(handler))
    with pytest.raises(NotRegistered, match="invalid_token: register again"):
        client.heartbeat("t", state="online")
    with pytest.raises(DiscoveryUnavailable, match="503"):
        client.challenge("Qm")
    unreachable = DiscoveryClient("http://127.0.0.1:9", timeout=1)
    with pytest.raises(DiscoveryUnavailable, match="unreachable"):
        unreachable.challenge("Qm")
    assert issubclass(NotRegistered, DiscoveryRefused)


def test_auto_block_count_fits_the_memory_limit(tiny_model_dir):
    from node_server.petals_server import fitting_num_blocks

    assert fitting_num_blocks(str(tiny_model_dir), torch_dtype="float32", memory_limit_bytes=2 * 1024**3) == 4
    assert fitting_num_blocks(str(tiny_model_dir), torch_dtype="float32", memory_limit_bytes=1) == 1
    assert validation.model_num_blocks(str(tiny_model_dir)) == 4
    # with the batched decode's packed copies (float32 on CPU) the weights count twice: never more blocks, and
    # fewer somewhere between one block and all of them
    counts = [(fitting_num_blocks(str(tiny_model_dir), torch_dtype="float32", memory_limit_bytes=2**k),
               fitting_num_blocks(str(tiny_model_dir), torch_dtype="float32", memory_limit_bytes=2**k,
                                  packed_copies=True)) for k in [16 + i / 8 for i in range(8 * 16)]]
    assert all(packed <= plain for plain, packed in counts)
    assert any(packed < plain for plain, packed in counts)


def test_status_says_whether_the_swarm_can_reach_the_node():
    from node_server.cli import format_status

    base = {"node_id": "n", "state": "online", "model_id": "m", "start_block": 0, "end_block": 2}
    assert "reachable    - (not checked yet)" in format_status(base, peer_id="Qm")
    ok = {**base, "reachability": {"reachable": True, "addresses": ["/ip4/10.0.0.5/tcp/31330"]}}
    assert "reachable    yes (/ip4/10.0.0.5/tcp/31330)" in format_status(ok, peer_id="Qm")
    bad = {**base, "reachability": {"reachable": False, "error": "dial refused", "hint": "use --public-address"}}
    text = format_status(bad, peer_id="Qm")
    assert "reachable    NO: dial refused" in text and "use --public-address" in text


def test_dht_announce_maddrs_parsing():
    from services.dht.bootstrap import parse_announce_maddrs

    assert parse_announce_maddrs("203.0.113.5, /ip4/198.51.100.7/tcp/4001, boot.example.org", 31337) == [
        "/ip4/203.0.113.5/tcp/31337", "/ip4/198.51.100.7/tcp/4001", "/dns/boot.example.org/tcp/31337"]
    assert parse_announce_maddrs("", 31337) == []
    with pytest.raises(ValueError, match="needs a fixed --port"):
        parse_announce_maddrs("203.0.113.5", 0)
    with pytest.raises(ValueError, match="not a multiaddr"):
        parse_announce_maddrs("/ip4/not-an-ip/tcp/1", 31337)
    with pytest.raises(ValueError, match="neither"):
        parse_announce_maddrs("two words", 31337)


def test_auto_block_count_counts_packed_copies_only_where_the_node_batches(tiny_model_dir, monkeypatch):
    """Batching off (by option or by FAR_MESH_DISABLE_COMPAT_FIX=batching): no packed copies, the plain count."""
    from node_server.petals_server import ServerOptions, fitting_num_blocks, resolve_server_options
    from services.common import packed_linear

    if not packed_linear.enabled():
        pytest.skip("this torch build has no oneDNN linear: nothing is packed")
    monkeypatch.delenv("FAR_MESH_DISABLE_COMPAT_FIX", raising=False)
    limits = [2**k for k in [16 + i / 8 for i in range(8 * 16)]]
    plain = [fitting_num_blocks(str(tiny_model_dir), torch_dtype="float32", memory_limit_bytes=limit)
             for limit in limits]
    limit = next(limit for limit, count, packed in zip(limits, plain, [
        fitting_num_blocks(str(tiny_model_dir), torch_dtype="float32", memory_limit_bytes=limit, packed_copies=True)
        for limit in limits]) if packed < count)
    expected_plain = fitting_num_blocks(str(tiny_model_dir), torch_dtype="float32", memory_limit_bytes=limit)

    def resolved(**changes):
        options = ServerOptions(model_path=str(tiny_model_dir), model_id="m", initial_peers=(), device="cpu",
                                torch_dtype="float32", memory_limit_gb=limit / 1024**3, **changes)
        return resolve_server_options(options)

    batched = resolved()
    assert batched.batching and batched.num_blocks < expected_plain
    assert resolved(batching=False).num_blocks == expected_plain
    monkeypatch.setenv("FAR_MESH_DISABLE_COMPAT_FIX", "batching")
    switched_off = resolved()
    assert not switched_off.batching and switched_off.num_blocks == expected_plain
