"""The default model's recommended sampling (services/models/catalog.py, applied by serving when a request omits
sampling fields): the demo question answered correctly. Runs the coordinator's own sampler and detokenizer over
SmolLM2 run locally with transformers (the swarm computes the same logits: tests/test_real_model.py), so no swarm
is started."""

from __future__ import annotations

from services.coordinator.engine import end_of_generation_ids
from services.coordinator.sampling import SamplingParams, TextStream, TokenSampler, sampling_defaults
from services.models.catalog import SMOLLM2

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _answer(model, tokenizer, params: SamplingParams) -> tuple[str, str]:
    """(text, finish reason) of one chat answer, token by token as engine.Generation does it."""
    import torch

    prompt_ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    sampler, text = TokenSampler(params, prompt_ids), TextStream(tokenizer, params.stop)
    eos = end_of_generation_ids(tokenizer, model.generation_config)
    with torch.inference_mode():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        for count in range(1, params.max_tokens + 1):
            token_id = sampler.sample(out.logits[0, -1])
            _, finish = text.accept(token_id, count=count, max_tokens=params.max_tokens,
                                    end_of_generation=token_id in eos)
            if finish is not None:
                return text.emitted, finish
            out = model(torch.tensor([[token_id]]), past_key_values=out.past_key_values, use_cache=True)
    raise AssertionError("accept() ends every generation by max_tokens")


def test_smollm2_defaults_answer_the_capital_of_france(smollm2_local):
    model, tokenizer = smollm2_local
    defaults = sampling_defaults(SMOLLM2.model_id)
    assert defaults["repetition_penalty"] > 1.0  # a repetition control is on by default
    answers = [_answer(model, tokenizer, SamplingParams(max_tokens=64, seed=seed, **defaults)) for seed in range(10)]
    assert sum("Paris" in text for text, _ in answers) >= 8, answers
    assert all(finish == "eos" for _, finish in answers), answers  # it ends its turn: no loop to max_tokens
