"""Build a Hugging Face Llama checkpoint from a llama.cpp GGUF file (pure file-to-directory conversion).

What the conversion relies on (checked on the default model's GGUF, docs/models.md):

* every tensor is dequantized to float32 with the ``gguf`` package; a tensor's ``shape`` lists dimensions
  fastest-first, so the flat array is reshaped to the reversed shape to get Hugging Face's ``[out, in]``;
* llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` for its rotary layout (adjacent pairs);
  :func:`unpermute_rotary` restores Hugging Face's half-split layout — without it the model is fluent garbage;
* the tokenizer is byte-level BPE (``tokens`` + ``merges`` in the metadata) pre-tokenized like llama.cpp's
  ``smollm`` pre-tokenizer: every digit its own piece, then the GPT-2 pattern;
* the chat template and the special tokens (control tokens) come from the GGUF metadata.

The output is deterministic: the same GGUF gives byte-identical files (safetensors with fixed metadata,
JSON with sorted keys), which the catalog records as sha256 sums.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np

# GGUF tensor name (per block: "blk.{i}.<name>") -> Hugging Face Llama parameter name
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: special tokens (<|im_start|>, ...)
# llama.cpp's "smollm" pre-tokenizer: digits split one by one, then the GPT-2 regex (applied by ByteLevel).
DIGIT_SPLIT_PATTERN = r"\p{N}"


class GGUFError(ValueError):
    """The GGUF file is not a model this converter supports."""


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's permutation of q/k rows: ``[rows, cols]`` -> ``[n, rows/n/2, 2, cols]``, swap axes 1
    and 2, back to ``[rows, cols]``."""
    rows, cols = weight.shape
    if rows % (2 * num_heads):
        raise GGUFError(f"cannot un-permute a {rows}-row tensor for {num_heads} heads")
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


class GGUFModel:
    """Metadata and tensors of one GGUF file (read lazily through ``gguf.GGUFReader``'s memory map)."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as error:  # a truncated or foreign file
            raise GGUFError(f"{self.path}: not a readable GGUF file ({error})") from None
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}
        arch = self.field("general.architecture")
        if arch != "llama":
            raise GGUFError(f"{self.path}: architecture {arch!r} is not supported (only 'llama')")

    def field(self, name: str, default=None):
        field = self.reader.fields.get(name)
        return default if field is None else field.contents()

    def require(self, name: str):
        value = self.field(name)
        if value is None:
            raise GGUFError(f"{self.path}: metadata {name!r} is missing")
        return value

    def tensor(self, name: str) -> np.ndarray:
        """A tensor dequantized to float32 in Hugging Face's layout (``[out, in]``)."""
        from gguf.quants import dequantize

        tensor = self.tensors[name]
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        return np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type).reshape(shape), dtype=np.float32)

    # ------------------------------------------------------------------------------------ Hugging Face side
    def llama_config(self) -> dict:
        heads = int(self.require("llama.attention.head_count"))
        vocab = len(self.require("tokenizer.ggml.tokens"))
        tied = "output.weight" not in self.tensors
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": int(self.require("llama.embedding_length")),
            "intermediate_size": int(self.require("llama.feed_forward_length")),
            "num_hidden_layers": int(self.require("llama.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.field("llama.attention.head_count_kv", heads)),
            "max_position_embeddings": int(self.require("llama.context_length")),
            "rms_norm_eps": float(self.require("llama.attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self.field("llama.rope.freq_base", 10000.0)),
            "vocab_size": vocab,
            "hidden_act": "silu",
            "tie_word_embeddings": tied,
            "bos_token_id": int(self.require("tokenizer.ggml.bos_token_id")),
            "eos_token_id": int(self.require("tokenizer.ggml.eos_token_id")),
            "pad_token_id": int(self.field("tokenizer.ggml.padding_token_id",
                                           self.require("tokenizer.ggml.eos_token_id"))),
            "torch_dtype": "float32",
            "use_cache": True,
        }

    def hf_tensor_names(self) -> list[tuple[str, str]]:
        """(GGUF name, Hugging Face name) for every tensor, in file order."""
        names = []
        for name in self.tensors:
            if name in _GLOBAL_TENSORS:
                names.append((name, _GLOBAL_TENSORS[name]))
                continue
            parts = name.split(".", 2)
            if len(parts) != 3 or parts[0] != "blk" or parts[2] not in _BLOCK_TENSORS:
                raise GGUFError(f"{self.path}: unexpected tensor {name!r}")
            names.append((name, f"model.layers.{int(parts[1])}.{_BLOCK_TENSORS[parts[2]]}"))
        return names

    def hf_tensor(self, gguf_name: str, config: dict) -> np.ndarray:
        array = self.tensor(gguf_name)
        if gguf_name.endswith("attn_q.weight"):
            array = unpermute_rotary(array, config["num_attention_heads"])
        elif gguf_name.endswith("attn_k.weight"):
            array = unpermute_rotary(array, config["num_key_value_heads"])
        return array

    def tokenizer(self):
        """A ``tokenizers.Tokenizer``: byte-level BPE from the GGUF vocabulary and merges."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        model_kind = self.require("tokenizer.ggml.model")
        if model_kind != "gpt2":
            raise GGUFError(f"{self.path}: tokenizer model {model_kind!r} is not supported (only byte-level BPE)")
        tokens = list(self.require("tokenizer.ggml.tokens"))
        merges = [tuple(merge.split(" ", 1)) for merge in self.require("tokenizer.ggml.merges")]
        types = list(self.field("tokenizer.ggml.token_type", [1] * len(tokens)))
        vocab = {token: index for index, token in enumerate(tokens)}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        pre = self.field("tokenizer.ggml.pre", "default")
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre == "smollm":
            steps.insert(0, pre_tokenizers.Split(Regex(DIGIT_SPLIT_PATTERN), behavior="isolated"))
        elif pre not in ("default", "gpt2"):
            raise GGUFError(f"{self.path}: pre-tokenizer {pre!r} is not supported")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
        tokenizer.decoder = decoders.ByteLevel()
        special = [AddedToken(token, special=True, normalized=False)
                   for token, kind in zip(tokens, types) if kind == TOKEN_TYPE_CONTROL]
        tokenizer.add_special_tokens(special)
        return tokenizer

    def tokenizer_config(self) -> dict:
        tokens = self.require("tokenizer.ggml.tokens")

        def token(key: str) -> Optional[str]:
            index = self.field(key)
            return None if index is None else tokens[int(index)]

        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token("tokenizer.ggml.bos_token_id"),
            "eos_token": token("tokenizer.ggml.eos_token_id"),
            "pad_token": token("tokenizer.ggml.padding_token_id") or token("tokenizer.ggml.eos_token_id"),
            "unk_token": token("tokenizer.ggml.unknown_token_id"),
            "add_bos_token": bool(self.field("tokenizer.ggml.add_bos_token", False)),
            "add_eos_token": bool(self.field("tokenizer.ggml.add_eos_token", False)),
            "clean_up_tokenization_spaces": False,
            "model_max_length": int(self.require("llama.context_length")),
        }
        template = self.field("tokenizer.chat_template")
        if template:
            config["chat_template"] = template
        return {key: value for key, value in config.items() if value is not None}


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *,
                 progress: Optional[Callable[[int, int, str], None]] = None) -> Path:
    """Write config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    special_tokens_map.json for ``gguf_path`` into ``out_dir`` (created; its content is replaced).
    ``progress(done, total, name)`` is called after every tensor."""
    from safetensors.numpy import save_file

    model = GGUFModel(gguf_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.llama_config()
    names = model.hf_tensor_names()
    tensors = {}
    for done, (gguf_name, hf_name) in enumerate(names, start=1):
        tensors[hf_name] = model.hf_tensor(gguf_name, config)
        if progress is not None:
            progress(done, len(names), hf_name)
    if config["tie_word_embeddings"]:
        tensors.pop("lm_head.weight", None)
    save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors

    _write_json(out / "config.json", {**config, "transformers_version": "4.34.1"})
    eos = [config["eos_token_id"]]
    endoftext = model.require("tokenizer.ggml.tokens").index("<|endoftext|>") if "<|endoftext|>" in \
        model.require("tokenizer.ggml.tokens") else None
    if endoftext is not None and endoftext not in eos:
        eos.append(endoftext)  # end of document also ends a completion
    _write_json(out / "generation_config.json", {"bos_token_id": config["bos_token_id"], "eos_token_id": eos,
                                                 "pad_token_id": config["pad_token_id"],
                                                 "transformers_version": "4.34.1"})
    model.tokenizer().save(str(out / "tokenizer.json"), pretty=False)
    tok_config = model.tokenizer_config()
    _write_json(out / "tokenizer_config.json", tok_config)
    _write_json(out / "special_tokens_map.json",
                {key: tok_config[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token")
                 if key in tok_config})
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
