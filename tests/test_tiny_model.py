"""`far-mesh make-model`: byte-identical output when run twice."""

from __future__ import annotations

import subprocess
import sys

from services.common.tiny_model import MODEL_FILES, model_digest


def test_make_model_is_byte_identical_when_run_twice(tmp_path, tiny_model_dir):
    second = tmp_path / "again"
    result = subprocess.run([sys.executable, "-m", "services.cli", "make-model", str(second)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in MODEL_FILES:
        assert (second / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert model_digest(second) == model_digest(tiny_model_dir)


def test_tiny_model_loads_and_tokenizes(tiny_model_dir, local_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("def compute(a, b):").input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) > 3
    assert tokenizer.decode(ids, skip_special_tokens=True) == "def compute(a, b):"
    assert local_model.config.num_hidden_layers == 4
