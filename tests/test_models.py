"""The model catalog: SmolLM2 converted from its GGUF (checked against an independent numpy reference),
its tokenizer and chat template, the verified build cache, `far-mesh models`, and clear hub failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from services.models.catalog import MANIFEST, SMOLLM2, TINY, pull, resolve_model, verify
from services.models.gguf_convert import unpermute_rotary
from tests.fixtures.swarm import free_port


def test_converted_logits_match_an_independent_reference(smollm2_local):
    """Logits of the converted checkpoint (transformers) vs llama.cpp's layout evaluated in numpy from the raw
    GGUF blocks (hand-decoded Q4_1/Q8_0, permuted q/k with adjacent-pair RoPE): no shared code path."""
    import torch

    from services.models.catalog import smollm2_gguf_path
    from tests.gguf_reference import ReferenceLlama

    model, tokenizer = smollm2_local
    ids = tokenizer("In 1889, the Eiffel Tower opened in Paris; it is 330 m tall.").input_ids
    reference = ReferenceLlama(smollm2_gguf_path()).logits(ids)
    with torch.inference_mode():
        converted = model(torch.tensor([ids])).logits[0].double().numpy()
    assert converted.shape == reference.shape == (len(ids), 49152)
    # float32 weights; the reference accumulates in float64: measured max |diff| ≈ 5e-5 on logits of ≈ 30
    assert np.abs(converted - reference).max() < 2e-3
    assert (converted.argmax(-1) == reference.argmax(-1)).all()


def test_unpermute_inverts_llama_cpp_permutation():
    def llama_cpp_permute(weights, heads):  # convert_hf_to_gguf.py's LlamaModel.permute
        return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
                .swapaxes(1, 2).reshape(weights.shape))

    weights = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
    for heads in (1, 3, 6):
        assert (unpermute_rotary(llama_cpp_permute(weights, heads), heads) == weights).all()


def test_tokenizer_special_tokens_digits_and_chat_template(smollm2_local):
    _model, tokenizer = smollm2_local
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|im_end|>")
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    text = "In 2024, 3.14 × 12 = 37.68"
    ids = tokenizer(text).input_ids
    assert ids[0] != tokenizer.bos_token_id  # add_bos_token=false
    assert tokenizer.decode(ids) == text
    # llama.cpp's "smollm" pre-tokenizer: every digit is its own piece
    pieces = [tokenizer.decode([i]) for i in ids]
    assert [p for p in pieces if p.strip().isdigit()] == list("2024314123768")
    assert tokenizer("<|im_start|>user").input_ids[0] == 1  # special tokens are atomic
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_build_is_deterministic_and_config_follows_the_gguf(smollm2_dir, tmp_path):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["max_position_embeddings"], config["vocab_size"],
            config["rope_theta"], config["tie_word_embeddings"]) == (30, 576, 9, 3, 8192, 49152, 100000.0, True)
    again = pull(SMOLLM2, tmp_path / "again", progress=False)
    first = json.loads((smollm2_dir / MANIFEST).read_text())["files"]
    assert json.loads((again / MANIFEST).read_text())["files"] == first
    assert set(first) == {"config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                          "tokenizer.json", "tokenizer_config.json"}


def test_processes_pulling_at_once_build_once(tmp_path):
    """`far-mesh up` starts three nodes that each pull the model: one builds, the others wait and reuse it."""
    code = ("import sys; from pathlib import Path; from services.models.catalog import TINY, pull; "
            "print(pull(TINY, Path(sys.argv[1]), progress=False, log=print))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "tiny")], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    assert sum("building" in out for out in outputs) == 1, outputs
    assert all(out.strip().endswith(str(tmp_path / "tiny")) for out in outputs)
    assert verify(tmp_path / "tiny") is None


def test_pull_reuses_a_verified_build_and_rebuilds_a_broken_one(tmp_path, monkeypatch):
    lines = []
    target = pull(TINY, tmp_path / "tiny", progress=False, log=lines.append)
    assert verify(target) is None and any("building" in line for line in lines)
    import services.models.catalog as catalog

    hashed, real_sha256 = [], catalog._sha256
    monkeypatch.setattr(catalog, "_sha256", lambda path: hashed.append(path.name) or real_sha256(path))
    assert verify(target) is None and hashed == []  # unchanged since the last check: not hashed again
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    lines.clear()
    assert pull(TINY, tmp_path / "tiny", progress=False, log=lines.append) == target
    assert lines == [] and (target / "model.safetensors").stat().st_mtime_ns == stamp  # nothing rebuilt

    with (target / "model.safetensors").open("r+b") as handle:  # corrupt one byte, same size
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert "checksum" in verify(target)
    pull(TINY, tmp_path / "tiny", progress=False, log=lines.append)
    assert any("rebuilding" in line and "checksum" in line for line in lines) and verify(target) is None

    (target / MANIFEST).unlink()  # an interrupted build (no manifest) is never reused
    assert verify(target) is not None
    pull(TINY, tmp_path / "tiny", progress=False, log=lines.append)
    assert verify(target) is None
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith(".")]  # no scratch left


def test_resolve_model_kinds(tmp_path, monkeypatch):
    monkeypatch.setenv("FAR_MESH_STATE_DIR", str(tmp_path / "state"))
    built = resolve_model(TINY.model_id, log=lambda line: None)
    assert built == str((tmp_path / "state" / "models" / "tiny-llama").resolve()) and verify(built) is None
    assert resolve_model("some-org/some-model") == "some-org/some-model"  # a hub name is left to transformers
    assert resolve_model(TINY.model_id, tmp_path) == str(tmp_path.resolve())


def _cli(*args, env_extra=None, timeout=120):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_models_list_and_pull_cli(tmp_path):
    listed = _cli("models", "list", "--dir", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    assert "smollm2-135m-instruct (default)" in listed.stdout and "far-mesh/smollm2-135m-instruct" in listed.stdout
    assert "not built" in listed.stdout and "tiny-llama" in listed.stdout and "needs" in listed.stdout
    pulled = _cli("models", "pull", "tiny-llama", "--dir", str(tmp_path / "tiny-llama"))
    assert pulled.returncode == 0 and pulled.stdout.strip().endswith(str(tmp_path / "tiny-llama"))
    assert "built (" in _cli("models", "list", "--dir", str(tmp_path)).stdout
    unknown = _cli("models", "pull", "nope")
    assert unknown.returncode == 2 and "unknown model 'nope'" in unknown.stderr


@pytest.mark.parametrize("command", ["coordinator", "node"])
def test_unreachable_hub_fails_at_start_with_one_line(command, tmp_path):
    """A hub model with the hub out of reach: one line naming the model and the endpoint, exit 2, no traceback."""
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf"), "FAR_MESH_STATE_DIR": str(tmp_path / "state"),
           "DEFAULT_MODEL_ID": "bigscience/bloom-560m", "FAR_MESH_MODEL_PATH": ""}
    if command == "coordinator":
        argv = [sys.executable, "-m", "services.cli", "coordinator", "--port", str(free_port())]
    else:
        argv = [sys.executable, "-m", "node_server.cli", "run", "--no-config", "--model", "bigscience/bloom-560m",
                "--blocks", "0:2", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmNoPeer", "--no-register"]
    result = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, **env), timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error = [line for line in lines if "cannot download model 'bigscience/bloom-560m'" in line]
    assert len(error) == 1 and env["HF_ENDPOINT"] in error[0], result.stderr
    assert "Traceback" not in result.stderr


def test_servers_accept_the_models_full_context(smollm2_dir, tiny_model_dir):
    """Coordinator and servers agree: a server's inference_max_length is the model's context (Petals' default
    would be 2048), and its attention cache holds at least one full-context session."""
    from node_server.petals_server import ServerOptions, _resolve_context, petals_server_kwargs
    from services.common import petals_adapter  # noqa: F401

    for path, context in ((smollm2_dir, 8192), (tiny_model_dir, 256)):
        options = _resolve_context(ServerOptions(model_path=str(path), model_id="m", initial_peers=("/ip4/x",),
                                                 blocks=None, num_blocks=1))
        kwargs = petals_server_kwargs(options)
        assert kwargs["inference_max_length"] == context and kwargs["attn_cache_tokens"] >= context
    explicit = ServerOptions(model_path=str(smollm2_dir), model_id="m", initial_peers=(), inference_max_length=512)
    assert _resolve_context(explicit).inference_max_length == 512
