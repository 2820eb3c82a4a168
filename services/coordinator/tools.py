"""Tools (function calling) on chat completions: the prompt, the grammar of a call, and reading calls back (pure).

The model calls tools by writing one block per call (the Hermes / Qwen format, which our generic tool prompt
teaches the models whose chat template has no tools section)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``ToolSpec.grammar()`` constrains the output (services/coordinator/structured.py): with ``tool_choice`` ``required``
or a named function the output *is* such blocks, each body valid JSON whose ``arguments`` satisfy the function's
parameters schema; with ``auto`` the output is either text that does not start with a block, or blocks. So a call
always parses. ``ToolCallReader`` turns the generated text (whole, or delta by delta when streamed) into content and
calls.
"""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from services.coordinator.structured import JSON_COMPILE_OPTIONS, UnsupportedSchema, check_grammar, grammar_for_schema

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
RESPONSE_OPEN = "<tool_response>"
RESPONSE_CLOSE = "</tool_response>"
ANY_ARGUMENTS = {"type": "object"}

GENERIC_TOOL_PROMPT = """# Tools

You may call one or more functions to answer. The functions, as JSON (parameters are a JSON Schema):
{functions}

To call functions, answer with one block per call and nothing else:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
</tool_call>
The results come back in <tool_response> blocks. Without a call, answer as usual.{requirement}"""


@dataclass(frozen=True)
class Function:
    name: str
    description: Optional[str]
    parameters: dict

    def as_json(self) -> dict:
        described = {"name": self.name}
        if self.description:
            described["description"] = self.description
        described["parameters"] = self.parameters
        return described


@dataclass(frozen=True)
class ToolSpec:
    """The request's ``tools`` and ``tool_choice`` (``auto``, ``none``, ``required`` or ``function`` with
    ``named``), and whether several calls may come in one answer (``parallel_tool_calls``)."""

    functions: tuple[Function, ...]
    choice: str = "auto"
    named: Optional[str] = None
    parallel: bool = True

    @property
    def calls_allowed(self) -> bool:
        return self.choice != "none" and bool(self.functions)

    def callable_functions(self) -> tuple[Function, ...]:
        if self.choice == "function":
            return tuple(f for f in self.functions if f.name == self.named)
        return self.functions

    def grammar(self) -> Optional[str]:
        """The llguidance grammar of the answer (None: tools may not be called). ``UnsupportedSchema`` names the
        function whose parameters cannot be enforced."""
        if not self.calls_allowed:
            return None
        from llguidance import LLMatcher

        bodies, definitions = [], {}
        for function in self.callable_functions():
            try:
                grammar_for_schema(function.parameters)  # refuse what cannot be enforced, naming the function
            except UnsupportedSchema as error:
                raise UnsupportedSchema(f"tool {function.name!r}: {error}") from None
            parameters = _hoist_definitions(function, definitions)
            bodies.append({"type": "object", "properties": {"name": {"const": function.name},
                                                            "arguments": parameters},
                           "required": ["name", "arguments"], "additionalProperties": False})
        body = {"anyOf": bodies, "x-guidance": JSON_COMPILE_OPTIONS, **definitions}
        # a named function is called once (OpenAI's forced function); parallel calls only under auto/required
        calls = 'call ("\\n" call)*' if self.parallel and self.choice != "function" else "call"
        lark = f'calls: {calls}\ncall: "{CALL_OPEN}\\n" %json {json.dumps(body)} "\\n{CALL_CLOSE}"\n'
        if self.choice == "auto":  # text (not starting a call), or calls
            start = f"start: TEXT | calls\nTEXT: /(?s:.*)/ & ~/{_regex_literal(CALL_OPEN)}(?s:.*)/\n"
        else:
            start = "start: calls\n"
        return check_grammar(LLMatcher.grammar_from_lark(start + lark))


def _hoist_definitions(function: Function, definitions: dict) -> dict:
    """The parameters without their ``$defs``/``definitions``, which move into ``definitions`` (the root of the
    call's schema, where their ``#/$defs/...`` references point once the parameters are nested in it)."""
    parameters = dict(function.parameters)
    for key in ("$defs", "definitions"):
        for name, schema in (parameters.pop(key, None) or {}).items():
            known = definitions.setdefault(key, {})
            if known.get(name, schema) != schema:
                raise UnsupportedSchema(f"tool {function.name!r}: {key}/{name} differs from another tool's")
            known[name] = schema
    return parameters


def _regex_literal(text: str) -> str:
    return "".join(f"\\{c}" if c in "\\.^$|?*+()[]{}/-" else c for c in text)


def tool_spec(tools: list, tool_choice: Any, parallel_tool_calls: Optional[bool]) -> Optional[ToolSpec]:
    """From the request's pydantic models (openai_protocol.Tool, tool_choice): None when no tools are given."""
    if not tools:
        return None
    functions = tuple(Function(t.function.name, t.function.description, t.function.parameters or ANY_ARGUMENTS)
                      for t in tools)
    if tool_choice is None:
        choice, named = "auto", None
    elif isinstance(tool_choice, str):
        choice, named = tool_choice, None
    else:
        choice, named = "function", tool_choice.function.name
        if named not in {f.name for f in functions}:
            raise UnsupportedSchema(f"tool_choice names {named!r}, which is not in tools")
    return ToolSpec(functions, choice, named, True if parallel_tool_calls is None else parallel_tool_calls)


# ------------------------------------------------------------------------------------------------ prompt
def template_has_tools(tokenizer) -> bool:
    """The tokenizer's chat template reads a ``tools`` variable (a tools section of its own)."""
    template = getattr(tokenizer, "chat_template", None)
    return bool(template) and _reads_tools(template)


@functools.lru_cache(maxsize=16)
def _reads_tools(template: str) -> bool:
    from jinja2 import Environment, meta

    return "tools" in meta.find_undeclared_variables(Environment().parse(template))


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def call_block(name: str, arguments: Any) -> str:
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CALL_CLOSE}"


def generic_turns(messages: list, spec: Optional[ToolSpec]) -> list[dict]:
    """``{"role", "content"}`` turns for a chat template without tools: the tool prompt joins the system message
    (one is added first if there is none); an assistant's calls become blocks; a tool result becomes a user turn
    with a ``<tool_response>`` block naming its function."""
    names = {}
    turns = []
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        content = message.text()
        if message.tool_calls:
            names.update({call.id: call.function.name for call in message.tool_calls})
            blocks = [call_block(c.function.name, _arguments(c.function.arguments)) for c in message.tool_calls]
            content = "\n".join(([content] if content else []) + blocks)
        if role == "tool":
            name = names.get(message.tool_call_id)
            result = {"name": name, "content": content} if name else {"content": content}
            role, content = "user", f"{RESPONSE_OPEN}\n{json.dumps(result, ensure_ascii=False)}\n{RESPONSE_CLOSE}"
        turns.append({"role": role, "content": content})
    if spec is not None and spec.calls_allowed:
        prompt = tool_prompt(spec)
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{prompt}"}
        else:
            turns.insert(0, {"role": "system", "content": prompt})
    return turns


def tool_prompt(spec: ToolSpec) -> str:
    functions = "\n".join(json.dumps(f.as_json(), ensure_ascii=False) for f in spec.callable_functions())
    requirement = ""
    if spec.choice == "required":
        requirement = "\nYou must call at least one function now."
    elif spec.choice == "function":
        requirement = f"\nYou must call the function {spec.named} now."
    return GENERIC_TOOL_PROMPT.format(functions=functions, requirement=requirement)


def template_turns(messages: list) -> list[dict]:
    """Turns for a chat template with a tools section (Hugging Face's message shape: calls with their arguments
    as objects, tool results with role ``tool``)."""
    turns = []
    for message in messages:
        turn: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                "content": message.text()}
        if message.tool_calls:
            turn["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in message.tool_calls]
        if message.role == "tool":
            turn["tool_call_id"] = message.tool_call_id
            name = next((c["function"]["name"] for t in turns for c in t.get("tool_calls", ())
                         if c["id"] == message.tool_call_id), None)
            if name:
                turn["name"] = name
        turns.append(turn)
    return turns


def render_with_template(tokenizer, messages: list, spec: Optional[ToolSpec]) -> str:
    """The prompt through the model's own chat template, given the tools (when they may be called)."""
    tools = None
    if spec is not None and spec.calls_allowed:
        tools = [{"type": "function", "function": f.as_json()} for f in spec.callable_functions()]
    template = tokenizer._compile_jinja_template(tokenizer.chat_template)
    return template.render(messages=template_turns(messages), tools=tools, add_generation_prompt=True,
                           **tokenizer.special_tokens_map)


# ------------------------------------------------------------------------------------------ reading calls
@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ToolCallReader:
    """Reads generated text (``feed`` delta by delta, then ``finish``) into content deltas and complete calls.

    Text outside blocks is content; trailing whitespace is held back until more content follows (so the line
    breaks around blocks never become content). A block whose body is not a call of a known function (possible
    only without a grammar) stays content, as written."""

    def __init__(self, spec: ToolSpec):
        self.names = {f.name for f in spec.functions}
        self.calls: list[ToolCall] = []
        self._buffer = ""
        self._in_call = False
        self._held = ""  # whitespace not emitted yet
        self.content_parts: list[str] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """The content to emit now and the calls completed by ``text``."""
        self._buffer += text
        content, calls = "", []
        while True:
            if self._in_call:
                end = self._buffer.find(CALL_CLOSE)
                if end == -1:
                    break
                body, self._buffer = self._buffer[:end], self._buffer[end + len(CALL_CLOSE):]
                self._in_call = False
                call = self._parse(body)
                if call is None:
                    content += self._content(f"{CALL_OPEN}{body}{CALL_CLOSE}")
                else:
                    calls.append(call)
                continue
            start = self._buffer.find(CALL_OPEN)
            if start == -1:
                keep = _partial_suffix(self._buffer, CALL_OPEN)
                content += self._content(self._buffer[:len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep:]
                break
            content += self._content(self._buffer[:start])
            self._buffer = self._buffer[start + len(CALL_OPEN):]
            self._in_call = True
        return content, calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end: an unclosed block that parses is a call (the generation stopped at its end), else text."""
        content, calls = "", []
        if self._in_call:
            call = self._parse(self._buffer)
            if call is None:
                content += self._content(CALL_OPEN + self._buffer)
            else:
                calls.append(call)
        else:
            content += self._content(self._buffer)
        self._buffer = ""
        if not self.calls and not calls:
            content += self._held
            self.content_parts.append(self._held)
        self._held = ""
        return content, calls

    @property
    def content(self) -> Optional[str]:
        """All content; None when it is empty (as OpenAI answers a message of calls only)."""
        text = "".join(self.content_parts)
        return text if text.strip() else None

    def _content(self, text: str) -> str:
        if not text:
            return ""
        text = self._held + text
        stripped = text.rstrip()
        self._held = text[len(stripped):]
        self.content_parts.append(stripped)
        return stripped

    def _parse(self, body: str) -> Optional[ToolCall]:
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        arguments = value.get("arguments", {})
        if isinstance(arguments, str):
            arguments = _arguments(arguments)
        if not isinstance(arguments, dict):
            return None
        call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", value["name"], json.dumps(arguments, ensure_ascii=False))
        self.calls.append(call)
        return call


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0
