"""An independent reference for the GGUF conversion: llama.cpp's own layout, computed with numpy only.

Nothing here shares code with services/models/gguf_convert.py: the quantized blocks are decoded by hand from
their byte layout (ggml's ``block_q4_1`` / ``block_q8_0``), the q/k weights stay in llama.cpp's permuted row
order, and rotary embeddings are applied the way llama.cpp applies them to that order (adjacent pairs,
"normal" RoPE) instead of Hugging Face's half-split. If the converter's un-permutation or reshape were wrong,
the logits would disagree.
"""

from __future__ import annotations

import numpy as np

QK = 32  # elements per quantization block
GGML_F32, GGML_Q4_1, GGML_Q8_0 = 0, 3, 8


def _decode(raw: bytes, kind: int, count: int) -> np.ndarray:
    if kind == GGML_F32:
        return np.frombuffer(raw, dtype="<f4", count=count).astype(np.float32)
    blocks = count // QK
    if kind == GGML_Q8_0:  # struct { half d; int8 qs[32]; }
        record = np.dtype([("d", "<f2"), ("qs", "i1", QK)])
        data = np.frombuffer(raw, dtype=record, count=blocks)
        return (data["d"].astype(np.float32)[:, None] * data["qs"].astype(np.float32)).reshape(-1)
    if kind == GGML_Q4_1:  # struct { half d; half m; uint8 qs[16]; }: low nibbles = x[0:16], high = x[16:32]
        record = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", QK // 2)])
        data = np.frombuffer(raw, dtype=record, count=blocks)
        low = (data["qs"] & 0x0F).astype(np.float32)
        high = (data["qs"] >> 4).astype(np.float32)
        q = np.concatenate([low, high], axis=1)
        return (q * data["d"].astype(np.float32)[:, None] + data["m"].astype(np.float32)[:, None]).reshape(-1)
    raise NotImplementedError(f"ggml type {kind}")


class ReferenceLlama:
    def __init__(self, gguf_path):
        from gguf import GGUFReader  # only the container parser; decoding is ours

        reader = GGUFReader(str(gguf_path))
        self.meta = {name: field.contents() for name, field in reader.fields.items()
                     if not name.startswith("tokenizer.ggml.")}
        self.w = {}
        for tensor in reader.tensors:
            shape = [int(d) for d in tensor.shape]  # fastest-first: [in, out]
            count = int(np.prod(shape))
            flat = _decode(np.asarray(tensor.data).tobytes(), int(tensor.tensor_type), count)
            self.w[tensor.name] = flat.reshape(shape[::-1])  # row-major [out, in]
        self.layers = int(self.meta["llama.block_count"])
        self.heads = int(self.meta["llama.attention.head_count"])
        self.kv_heads = int(self.meta["llama.attention.head_count_kv"])
        self.eps = float(self.meta["llama.attention.layer_norm_rms_epsilon"])
        self.base = float(self.meta["llama.rope.freq_base"])

    def _norm(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def _rope_adjacent(self, x):
        """llama.cpp "normal" RoPE: rotates (x[2i], x[2i+1]) by pos * base^(-2i/d). x: [seq, heads, d]."""
        seq, _, dim = x.shape
        inv = self.base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles = np.arange(seq)[:, None] * inv[None, :]
        cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits of every position, [seq, vocab] (float32 weights, float64 activations)."""
        w = self.w
        x = w["token_embd.weight"][ids].astype(np.float64)
        seq = len(ids)
        mask = np.triu(np.full((seq, seq), -np.inf), k=1)
        for i in range(self.layers):
            p = f"blk.{i}."
            h = self._norm(x, w[p + "attn_norm.weight"])
            q = (h @ w[p + "attn_q.weight"].T).reshape(seq, self.heads, -1)
            k = (h @ w[p + "attn_k.weight"].T).reshape(seq, self.kv_heads, -1)
            v = (h @ w[p + "attn_v.weight"].T).reshape(seq, self.kv_heads, -1)
            q, k = self._rope_adjacent(q), self._rope_adjacent(k)
            group = self.heads // self.kv_heads
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1]) + mask
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            attn = np.einsum("hqk,khd->qhd", scores, v).reshape(seq, -1)
            x = x + attn @ w[p + "attn_output.weight"].T
            h = self._norm(x, w[p + "ffn_norm.weight"])
            gate = h @ w[p + "ffn_gate.weight"].T
            x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        x = self._norm(x, w["output_norm.weight"])
        head = w.get("output.weight", w["token_embd.weight"])  # tied when there is no output.weight
        return x @ head.T
