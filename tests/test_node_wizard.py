"""``far-node start``: the same config from a pseudo-terminal (every prompt answered, invalid answers re-asked)
and from flags only (``--yes``); invalid flags exit non-zero naming the flag."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pexpect
import pytest

from node_server.config import load_config
from tests.node_support import FakeDiscovery

WALLET = "0x52908400098527886e0f7030069857d2e4169ee7"  # valid, not checksummed
CHECKSUMMED = "0x52908400098527886E0F7030069857D2E4169EE7"
BOOTSTRAP = "/ip4/127.0.0.1/tcp/31337/p2p/QmXWGd5Wsq8Mu6vVnB5C6h6c4MfJZN2NYWF5bhLRSN8Bdv"
DOWN, CLEAR_LINE = "\x1b[B", "\x15"  # arrow down; Ctrl-U clears the answer typed so far


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    return path


@pytest.fixture
def discovery():
    with FakeDiscovery() as fake:
        fake.models = {"far-mesh/tiny-llama": 4, "org/other-model": 32}
        yield fake


def node_env(tmp_path) -> dict:
    return dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"), FAR_MESH_STATE_DIR=str(tmp_path / "state"),
                FAR_MESH_DHT_BOOTSTRAP=BOOTSTRAP, DEFAULT_MODEL_ID="far-mesh/tiny-llama", FAR_MESH_MODEL_PATH="",
                FAR_NODE_NO_TORCH_PROBE="1", COLUMNS="120", TERM="xterm",
                PROMPT_TOOLKIT_NO_CPR="1")  # pexpect does not answer cursor-position requests (~1.5 s each)


def start_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node_server.cli", "start", *args], env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60)


def test_wizard_in_a_pty_and_with_flags_write_the_same_config(tmp_path, model_dir, discovery):
    pty_env = node_env(tmp_path / "pty")
    child = pexpect.spawn(sys.executable, ["-m", "node_server.cli", "start", "--discovery-url", discovery.url],
                          env=pty_env, encoding="utf-8", timeout=30, dimensions=(40, 120))
    transcript = tmp_path / "pty.log"
    child.logfile_read = transcript.open("w")

    def answer(prompt: str, keys: str, *, pause: float = 0.0):
        child.expect(prompt)
        if pause:  # selects: let the list render before moving in it
            time.sleep(pause)
        child.send(keys)

    try:
        # One invalid answer per question: prompt_toolkit redraws only the cells that changed, so a second
        # error message on the same question would not appear as one string in the transcript.
        answer("Payout wallet address", WALLET[:-1] + "E\r")  # mixed case that fails the checksum
        answer("fails its EIP-55 checksum", CLEAR_LINE + WALLET + "\r")
        answer(f"checksummed form {CHECKSUMMED}", "\r")
        answer("Which model will you serve", DOWN + DOWN, pause=0.3)  # models discovery knows, then Local path
        child.expect("org/other-model")
        child.send("\r")
        answer("Model directory", f"{tmp_path}/nowhere\r")
        answer("is not a directory", CLEAR_LINE + f"{model_dir}\r")
        answer("Model id announced in the swarm", "\r")  # default: DEFAULT_MODEL_ID
        answer("Which blocks will you serve", DOWN, pause=0.3)
        child.send("\r")
        answer(r"Block range START:END \(the model has blocks 0:4\)", "2:6\r")
        answer("goes past the model's 4 blocks", CLEAR_LINE + "0:2\r")
        answer("Public address other peers will reach", "127.0.0.1", pause=0.3)  # type to filter the list
        time.sleep(0.3)
        child.send("\r")
        answer("TCP port", CLEAR_LINE + "70000\r")
        answer("out of range: use 1-65535", CLEAR_LINE + "31331\r")
        answer("Device", "\r", pause=0.3)
        answer("Weights dtype", "\r", pause=0.3)
        answer("Memory limit in GB", CLEAR_LINE + "lots\r")
        answer("is not a memory limit", CLEAR_LINE + "8\r")
        answer("DHT bootstrap peers", "\r")  # default: FAR_MESH_DHT_BOOTSTRAP
        answer("Write this configuration to", "\r")
        child.expect("Node identity created: peer ID Qm")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, transcript.read_text()[-3000:]
    pty_path = tmp_path / "pty" / "xdg" / "far-mesh" / "node.toml"
    assert stat.S_IMODE(pty_path.stat().st_mode) == 0o600

    flags_env = node_env(tmp_path / "flags")
    flags_env["FAR_MESH_STATE_DIR"] = pty_env["FAR_MESH_STATE_DIR"]  # the same identity path in both configs
    flags_path = tmp_path / "flags.toml"
    result = start_cli(flags_env, "--yes", "--config", str(flags_path), "--wallet", WALLET, "--model",
                       str(model_dir), "--blocks", "0:2", "--public-address", "127.0.0.1", "--port", "31331",
                       "--device", "cpu", "--dtype", "float32", "--memory-limit", "8", "--discovery-url",
                       discovery.url)
    assert result.returncode == 0, result.stderr
    assert "Node identity reused" in result.stdout  # created once by the pty run, reused
    assert stat.S_IMODE(flags_path.stat().st_mode) == 0o600

    pty_config, flags_config = load_config(pty_path), load_config(flags_path)
    assert pty_config == flags_config
    assert pty_config.wallet_address == CHECKSUMMED
    assert (pty_config.model, pty_config.model_id, pty_config.blocks) == (str(model_dir), "far-mesh/tiny-llama", "0:2")
    assert (pty_config.public_address, pty_config.host, pty_config.port) == ("127.0.0.1", "127.0.0.1", 31331)
    assert (pty_config.device, pty_config.dtype, pty_config.memory_limit_gb) == ("cpu", "float32", 8.0)
    assert pty_config.initial_peers == [BOOTSTRAP]


@pytest.mark.parametrize("flag,value,message", [
    ("--wallet", "0x1234", "40 hex digits"),
    ("--wallet", WALLET[:-1] + "E", "EIP-55 checksum"),
    ("--port", "70000", "out of range"),
    ("--port", "http", "not a port number"),
    ("--blocks", "2:6", "goes past the model's 4 blocks"),
    ("--blocks", "3:1", "empty"),
    ("--memory-limit", "-2", "not a memory limit"),
    ("--device", "cuda:3", "not available"),
    ("--initial-peers", "localhost:31337", "multiaddr"),
])
def test_unattended_invalid_flag_exits_naming_the_flag(tmp_path, model_dir, flag, value, message):
    args = {"--wallet": WALLET, "--model": str(model_dir), "--public-address": "127.0.0.1",
            "--discovery-url": "http://127.0.0.1:9", flag: value}
    config = tmp_path / "node.toml"
    result = start_cli(node_env(tmp_path), "--yes", "--config", str(config),
                       *[item for pair in args.items() for item in pair])
    assert result.returncode == 2
    assert result.stderr.startswith(f"far-node: {flag}: ") and message in result.stderr, result.stderr
    assert not config.exists()


def test_unattended_defaults_and_required_wallet(tmp_path, model_dir):
    env = node_env(tmp_path)
    env["FAR_MESH_MODEL_PATH"] = str(model_dir)  # the local copy of DEFAULT_MODEL_ID
    result = start_cli(env, "--yes", "--discovery-url", "http://127.0.0.1:9")
    assert result.returncode == 2 and "far-node: --wallet: " in result.stderr and "required" in result.stderr
    result = start_cli(env, "--discovery-url", "http://127.0.0.1:9", "--wallet", WALLET)  # no --yes, no TTY
    assert result.returncode == 2 and "far-node: --model: " in result.stderr and "not a terminal" in result.stderr
    result = start_cli(env, "--yes", "--wallet", WALLET, "--discovery-url", "http://127.0.0.1:9")
    assert result.returncode == 0, result.stderr
    config = load_config(tmp_path / "xdg" / "far-mesh" / "node.toml")
    assert config.wallet_address == CHECKSUMMED and config.blocks == "auto" and config.port == 31330
    assert (config.model, config.model_id) == (str(model_dir), "far-mesh/tiny-llama")
    assert config.device == "cpu" and config.dtype == "float32" and config.memory_limit_gb is None
    assert config.identity_path == str(tmp_path / "state" / "node" / "identity.key")
