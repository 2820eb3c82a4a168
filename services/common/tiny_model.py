"""``far-mesh make-model``: a tiny, deterministic Llama for the demo and the tests.

The Hugging Face hub is out of reach here, so the project builds its own model: a SentencePiece BPE
tokenizer trained offline (one thread, fixed options) on fixed files of the Python standard library, and a
4-block Llama with random weights drawn from a fixed seed. Running it twice on the same Python version gives
byte-identical files (a test checks this). Real deployments name hub models instead.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import sysconfig
import tempfile
from pathlib import Path

SEED = 20240601
VOCAB_SIZE = 512
# Files of the standard library whose text trains the tokenizer (stable within a Python minor version).
CORPUS_FILES = ("textwrap.py", "string.py", "shlex.py", "this.py", "calendar.py", "fractions.py", "heapq.py")
CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
               "tokenizer.model", "tokenizer_config.json")


def corpus_text() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((stdlib / name).read_text(encoding="utf-8") for name in CORPUS_FILES)


def _train_tokenizer(out_dir: Path) -> Path:
    import sentencepiece as spm

    model = io.BytesIO()
    lines = [line for line in corpus_text().splitlines() if line.strip() and line.isascii()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=VOCAB_SIZE,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        num_threads=1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def build_tiny_model(directory: str | Path, *, force: bool = False) -> Path:
    """Write the tiny model to ``directory``; returns the directory. Skips the work if it is already complete."""
    from services.common import petals_adapter  # noqa: F401  (sets HF offline mode before transformers)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    directory = Path(directory)
    if directory.exists() and not force and all((directory / name).exists() for name in MODEL_FILES):
        return directory
    with tempfile.TemporaryDirectory(prefix="far-mesh-model-") as tmp:
        tmp_dir = Path(tmp)
        _train_tokenizer(tmp_dir)
        tokenizer = LlamaTokenizer(vocab_file=str(tmp_dir / "tokenizer.model"), legacy=False)
        tokenizer.save_pretrained(tmp_dir)

        torch.manual_seed(SEED)
        config = LlamaConfig(vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=2, pad_token_id=None, **CONFIG)
        config.torch_dtype = "float32"
        model = LlamaForCausalLM(config)
        # Random init is too flat to generate varied text; scale the output head so greedy decoding is
        # decisive (ties between logits would make swarm-vs-local comparisons flaky).
        # Byte-fallback pieces (ids 3..258) are zeroed in the head so generated text is made of real pieces.
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
            model.lm_head.weight[3 : 3 + 256].zero_()
        model.save_pretrained(tmp_dir, safe_serialization=True)
        for extra in ("added_tokens.json",):
            (tmp_dir / extra).unlink(missing_ok=True)
        if directory.exists():
            shutil.rmtree(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tmp_dir, directory)
    return directory


def model_digest(directory: str | Path) -> str:
    """sha256 over the model's files (name + bytes), for determinism checks."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()

