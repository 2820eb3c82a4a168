"""``far-node run``'s option merge (node_server/run_options.py): flags over the config file over the environment,
and every refusal, with plain values in place of the machine."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from node_server.config import NodeConfig
from node_server.run_options import Machine, RunFlags, RunOptionError, resolve_run_options
from services.common.swarm import BlockSpan

WALLET = "0x52908400098527886E0F7030069857D2E4169EE7"
PEER = "/ip4/127.0.0.1/tcp/31337/p2p/QmBootstrap"
SETTINGS = types.SimpleNamespace(FAR_MESH_MODEL_PATH="", DEFAULT_MODEL_ID="default/model",
                                 FAR_MESH_DHT_BOOTSTRAP=PEER, DISCOVERY_URL="http://discovery:8200")


def machine(*, dirs=("/models/tiny",), blocks=4, gpu_dtype="bfloat16"):
    """A machine with the model directories ``dirs`` (``blocks`` blocks each) that records prepare_weights calls."""
    calls = []

    def prepare_weights(model_id, model, model_is_dir):
        calls.append((model_id, model, model_is_dir))
        return model if model_is_dir else f"/cache/{model_id}"

    found = Machine(prepare_weights=prepare_weights,
                    default_dtype=lambda device: "float32" if device == "cpu" else gpu_dtype,
                    model_num_blocks=lambda model: blocks, is_dir=lambda model: model in dirs,
                    state_dir=Path("/state/node"))
    object.__setattr__(found, "calls", calls)  # frozen dataclass
    return found


def resolve(flags=None, node=None, settings=SETTINGS, *, from_config_file=False, on=None):
    return resolve_run_options(flags or RunFlags(), node or NodeConfig(host="127.0.0.1", port=0), settings,
                               on or machine(), from_config_file=from_config_file)


def test_flags_alone_give_the_server_and_its_registration():
    options = resolve(RunFlags(model="/models/tiny", blocks="0:2", wallet=WALLET.lower(), port=31330,
                               public_address="203.0.113.7"))
    server = options.server
    assert (server.model_path, server.model_id) == ("/models/tiny", "default/model")
    assert server.blocks == BlockSpan(0, 2) and server.num_blocks is None
    assert server.initial_peers == (PEER,) and (server.device, server.torch_dtype) == ("cpu", "float32")
    assert (server.host, server.port, server.announce_host) == ("127.0.0.1", 31330, "203.0.113.7")
    assert options.identity_path == Path("/state/node/identity.key")
    assert server.identity_path == "/state/node/identity.key"
    assert options.wallet_address == WALLET  # checksummed
    assert options.discovery_url == "http://discovery:8200" and options.heartbeat_interval is None
    assert server.batching and server.batch_wait_ms == 50.0 and server.torch_threads == 1


def test_flags_override_the_config_file_which_overrides_the_environment():
    node = NodeConfig(wallet_address=WALLET, model="hub/model-a", blocks="auto", num_blocks=3, host="0.0.0.0",
                      port=31330, device="cuda:0", dtype=None, memory_limit_gb=6.0, initial_peers=["/ip4/10.0.0.1"],
                      discovery_url="http://other:8200", public_name="alice")
    options = resolve(RunFlags(port=31331, public_name="bob"), node, from_config_file=True)
    server = options.server
    # a hub name: its own id, fetched through prepare_weights
    assert (server.model_id, server.model_path) == ("hub/model-a", "/cache/hub/model-a")
    assert server.blocks is None and server.num_blocks == 3  # "auto" from the file: Petals picks, 3 of them
    assert (server.host, server.port, server.public_name) == ("0.0.0.0", 31331, "bob")
    assert server.device == "cuda:0" and server.torch_dtype == "bfloat16"  # the GPU's default
    assert server.memory_limit_gb == 6.0 and server.initial_peers == ("/ip4/10.0.0.1",)
    assert options.discovery_url == "http://other:8200"
    assert resolve(RunFlags(dtype="float16", memory_limit="2"), node, from_config_file=True).server.torch_dtype == \
        "float16"


def test_the_weights_are_prepared_with_the_announced_id():
    here = machine()
    resolve(RunFlags(model="/models/tiny", model_id="org/tiny", blocks="auto", no_register=True), on=here)
    resolve(RunFlags(model="SmolLM2-135M", blocks="auto", no_register=True), on=here)
    assert here.calls == [("org/tiny", "/models/tiny", True), ("SmolLM2-135M", "SmolLM2-135M", False)]


def test_no_register_needs_no_wallet():
    options = resolve(RunFlags(model="/models/tiny", blocks="auto", no_register=True))
    assert options.discovery_url is None and options.wallet_address is None
    assert resolve(RunFlags(model="/models/tiny", blocks="auto", discovery_url=" ")).discovery_url is None


def test_announcing_the_listen_address_announces_nothing():
    options = resolve(RunFlags(model="/models/tiny", blocks="auto", no_register=True, host="10.0.0.5", port=31330,
                               public_address="10.0.0.5"))
    assert options.server.announce_host is None


@pytest.mark.parametrize("flags,settings,flag,words", [
    (RunFlags(model="/models/tiny", blocks="auto", no_register=True), {"FAR_MESH_DHT_BOOTSTRAP": ""},
     "--initial-peers", "no DHT bootstrap peers"),
    (RunFlags(model="/models/tiny", no_register=True), {}, "--blocks", "give a block span"),
    (RunFlags(model="/models/tiny", blocks="2:9", no_register=True), {}, "--blocks", ""),
    (RunFlags(model="/models/tiny", blocks="auto", no_register=True, port=70000), {}, "--port", "not a TCP port"),
    (RunFlags(model="/models/tiny", blocks="auto", no_register=True, public_address="203.0.113.7"), {},
     "--public-address", "needs a fixed --port"),
    (RunFlags(model="/models/tiny", blocks="auto"), {}, "--wallet", "no payout wallet configured"),
    (RunFlags(model="/models/tiny", blocks="auto", wallet="0x1234"), {}, "--wallet", "40 hex digits"),
    (RunFlags(model="/models/tiny", blocks="auto", no_register=True, heartbeat_interval=0), {},
     "--heartbeat-interval", "must be positive"),
    (RunFlags(model="/models/tiny", blocks="auto", no_register=True, device="tpu"), {}, "--device", ""),
    (RunFlags(model="/models/tiny", blocks="auto", no_register=True, memory_limit="lots"), {}, "--memory-limit", ""),
])
def test_refusals_name_the_flag(flags, settings, flag, words):
    with pytest.raises(RunOptionError) as error:
        resolve(flags, settings=types.SimpleNamespace(**{**vars(SETTINGS), **settings}))
    assert error.value.flag == flag and words in error.value.message
