"""Tools on chat completions (services/coordinator/tools.py): the prompt (the model's template or the generic tool
prompt), the grammar of calls, reading calls back, and a round trip with the official ``openai`` client (call →
tool message → answer, streamed and not) over the real app and the scripted engine emitting logits."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal

import jsonschema_rs
import openai
import pytest

from services.common.config import Settings
from services.coordinator.openai_protocol import ChatCompletionRequest, render_chat
from services.coordinator.structured import UnsupportedSchema
from services.coordinator.tools import ToolCallReader, tool_spec
from tests.fixtures.swarm import create_api_key
from tests.scripted_engine import Script, ScriptedModel, ScriptedReadiness, scripted_engine, serve_app
from tests.test_structured import preferring, sample_constrained

MODEL_ID = "test/tools"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"],
             "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_TEXT = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}\n</tool_call>'


def spec_of(tool_choice=None, parallel=None, tools=TOOLS):
    body = ChatCompletionRequest.model_validate({"messages": ASK, "tools": tools, "tool_choice": tool_choice,
                                                 "parallel_tool_calls": parallel})
    return tool_spec(body.tools, body.tool_choice, body.parallel_tool_calls)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ------------------------------------------------------------------------------------------------- pure
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_and_named_calls_always_parse(tokenizer, seed, choice):
    """Whatever the model prefers (free text, then noise), the answer is one call whose arguments validate
    (``parallel_tool_calls`` false: a noisy model could otherwise go on calling until max_tokens)."""
    spec = spec_of(choice, parallel=False)
    text, _ = sample_constrained(tokenizer, spec.grammar(), preferring(tokenizer, "I think it is sunny", seed=seed),
                                 max_tokens=200, temperature=1.0, seed=seed)
    reader = ToolCallReader(spec)
    reader.feed(text)
    reader.finish()
    (call,) = reader.calls
    assert reader.content is None, text
    if choice != "required":
        assert call.name == "get_weather"
    schema = WEATHER if call.name == "get_weather" else TOOLS[1]["function"]["parameters"]
    jsonschema_rs.validate(schema, json.loads(call.arguments))


def test_parallel_calls(tokenizer):
    two = CALL_TEXT + '\n<tool_call>\n{"name":"get_time","arguments":{"zone":"CET"}}\n</tool_call>'
    text, _ = sample_constrained(tokenizer, spec_of("required").grammar(), preferring(tokenizer, two), max_tokens=200)
    assert text == two
    text, _ = sample_constrained(tokenizer, spec_of("required", parallel=False).grammar(),
                                 preferring(tokenizer, two), max_tokens=200)
    assert text == CALL_TEXT
    named = {"type": "function", "function": {"name": "get_weather"}}
    text, _ = sample_constrained(tokenizer, spec_of(named).grammar(), preferring(tokenizer, two), max_tokens=200)
    assert text == CALL_TEXT  # a named function is called once


def test_auto_lets_the_model_answer_in_text_or_call(tokenizer):
    spec = spec_of("auto")
    text, _ = sample_constrained(tokenizer, spec.grammar(), preferring(tokenizer, "It is sunny."))
    assert text == "It is sunny."
    text, _ = sample_constrained(tokenizer, spec.grammar(), preferring(tokenizer, CALL_TEXT), max_tokens=200)
    assert text == CALL_TEXT
    # a call begun with arguments the schema refuses is kept to the schema
    bad = CALL_TEXT.replace('"celsius"', '"kelvin"')
    text, _ = sample_constrained(tokenizer, spec.grammar(), preferring(tokenizer, bad), max_tokens=200)
    reader = ToolCallReader(spec)
    reader.feed(text)
    reader.finish()
    jsonschema_rs.validate(WEATHER, json.loads(reader.calls[0].arguments))


def test_none_offers_no_calls():
    assert spec_of("none").grammar() is None


def test_unknown_named_function_and_unsupported_parameters_are_refused():
    with pytest.raises(UnsupportedSchema, match="'nope'"):
        spec_of({"type": "function", "function": {"name": "nope"}})
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "array", "uniqueItems": True}}}}}]
    with pytest.raises(UnsupportedSchema, match="tool 'f'.*uniqueItems"):
        spec_of("required", tools=tools).grammar()


def test_pydantic_definitions_are_kept_reachable(tokenizer):
    """Parameters with $defs (pydantic's) still resolve once nested in the call's schema."""
    tools = [{"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "properties": {"where": {"$ref": "#/$defs/Place"}}, "required": ["where"],
        "additionalProperties": False, "$defs": {"Place": {"type": "object", "properties": {"city": {
            "enum": ["Oslo", "Rome"]}}, "required": ["city"], "additionalProperties": False}}}}}]
    text, _ = sample_constrained(tokenizer, spec_of("required", tools=tools).grammar(),
                                 preferring(tokenizer, "no"), max_tokens=100)
    assert json.loads(text.split("\n")[1])["arguments"]["where"]["city"] in ("Oslo", "Rome")


@pytest.mark.parametrize("pieces", [[CALL_TEXT], list(CALL_TEXT), ["Let me check.\n", CALL_TEXT[:7], CALL_TEXT[7:]]])
def test_reader_streams_content_and_calls(pieces):
    reader = ToolCallReader(spec_of())
    content, calls = "", []
    for piece in pieces:
        text, done = reader.feed(piece)
        content, calls = content + text, calls + done
    text, done = reader.finish()
    content, calls = content + text, calls + done
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris",
                                                                                   "unit": "celsius"})]
    assert content == ("Let me check." if len(pieces) == 3 else "") and reader.content == (content or None)


def test_reader_keeps_text_that_is_not_a_call():
    reader = ToolCallReader(spec_of())
    text = 'Use <tool_call>{"name": "unknown"}</tool_call> here. '
    content = reader.feed(text)[0] + reader.finish()[0]
    assert content == text and not reader.calls


def test_generic_prompt_renders_tools_calls_and_results(tokenizer):
    """Without a tools section in the template: the tool prompt in the system turn, calls as blocks, results as
    <tool_response> blocks naming their function."""
    messages = ChatCompletionRequest.model_validate({"messages": ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city":"Paris","unit":"celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]}).messages
    prompt, stops = render_chat(tokenizer, messages, spec_of())
    assert prompt.startswith("<|system|>\n# Tools") and '"name": "get_weather"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in prompt
    assert '<tool_response>\n{"name": "get_weather", "content": "18 C, sunny"}\n</tool_response>' in prompt
    assert prompt.endswith("<|assistant|>\n") and stops


def test_a_template_with_a_tools_section_gets_the_tools(tokenizer):
    templated = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    templated.chat_template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% if m.tool_calls %}"
        "{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
        "{% endif %}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    messages = ChatCompletionRequest.model_validate({"messages": ASK + [
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "cold"}]}).messages
    prompt, _ = render_chat(templated, messages, spec_of())
    assert prompt.startswith("TOOLS:get_weather;get_time;[user]") and "CALL get_weather Oslo" in prompt
    assert "[tool]cold" in prompt and "# Tools" not in prompt


# ------------------------------------------------------------------------------------------ through the API
@pytest.fixture(scope="module")
def live(tokenizer, postgres_url, redis_url):
    from services.coordinator.app import create_app

    model = ScriptedModel(MODEL_ID, tokenizer, context_length=2048)  # the tool prompt in the toy's small vocabulary
    settings = Settings(POSTGRES_URL=postgres_url, REDIS_URL=redis_url, DEFAULT_MODEL_ID=MODEL_ID, JWT_SECRET="",
                        PRICE_PER_TOKEN_FAR=Decimal("0.0001"), PRICE_PER_PROMPT_TOKEN_FAR=Decimal(0),
                        GENERATION_TIMEOUT_S=60)
    app = create_app(settings, coordinator_id=f"tools-{uuid.uuid4().hex[:6]}",
                     engine_factory=scripted_engine(model, ScriptedReadiness(MODEL_ID)))
    with serve_app(app, "tools-coordinator") as url:
        _, key = asyncio.run(create_api_key(postgres_url, balance="100"))
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0), model


def ask(client, model, messages, *, stream: bool, says: str, **options):
    """One chat completion while the scripted model prefers ``says``: (message dict, finish_reason)."""
    model.script = Script(logits=preferring(model.tokenizer, says, seed=7))
    if not stream:
        answer = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, max_tokens=120,
                                                temperature=0, **options)
        message = answer.choices[0].message
        return message.model_dump(exclude_none=True), answer.choices[0].finish_reason
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, max_tokens=120,
                                                temperature=0, stream=True, **options):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "type": "function",
                                                  "function": {"name": "", "arguments": ""}})
            call["id"] = delta.id or call["id"]
            call["function"]["name"] += (delta.function.name or "") if delta.function else ""
            call["function"]["arguments"] += (delta.function.arguments or "") if delta.function else ""
        finish = choice.finish_reason or finish
    message = {"role": "assistant", **({"content": content} if content else {})}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message, finish


@pytest.mark.parametrize("stream", [False, True])
def test_round_trip_with_the_official_client(live, stream):
    client, model = live
    message, finish = ask(client, model, ASK, stream=stream, says=CALL_TEXT, tool_choice="required")
    assert finish == "tool_calls" and "content" not in message
    (call,) = message["tool_calls"]
    assert call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    jsonschema_rs.validate(WEATHER, json.loads(call["function"]["arguments"]))
    history = ASK + [message, {"role": "tool", "tool_call_id": call["id"], "content": "18 C and sunny"}]
    answer, finish = ask(client, model, history, stream=stream, says="It is 18 C and sunny in Paris.")
    assert finish == "stop" and answer == {"role": "assistant", "content": "It is 18 C and sunny in Paris."}
    prompt = model.tokenizer.decode(model.started[-1].prompt_ids)
    assert "<tool_response>" in prompt and '"name": "get_weather"' in prompt and "18 C and sunny" in prompt


def test_the_returned_message_object_goes_back_as_is(live):
    """The usual client code appends the SDK's message object itself to the conversation."""
    client, model = live
    model.script = Script(logits=preferring(model.tokenizer, CALL_TEXT, seed=7))
    answer = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=120, temperature=0)
    message = answer.choices[0].message
    history = ASK + [message, {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "cold"}]
    model.script = Script(logits=preferring(model.tokenizer, "Cold.", seed=7))
    final = client.chat.completions.create(model=MODEL_ID, messages=history, tools=TOOLS, max_tokens=20,
                                           temperature=0)
    assert final.choices[0].message.content == "Cold." and final.choices[0].finish_reason == "stop"


def test_auto_answers_in_text_and_none_never_calls(live):
    client, model = live
    message, finish = ask(client, model, ASK, stream=False, says="Sunny.")
    assert message == {"role": "assistant", "content": "Sunny."} and finish == "stop"
    message, finish = ask(client, model, ASK, stream=False, says=CALL_TEXT, tool_choice="none")
    assert "tool_calls" not in message and finish == "stop"


def test_refusals_name_the_problem(live):
    client, _ = live
    with pytest.raises(openai.BadRequestError, match="nope"):
        client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS,
                                       response_format={"type": "json_object"})
