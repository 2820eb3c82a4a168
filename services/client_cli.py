"""``far-mesh chat`` (interactive, multi-turn, streaming, cost per answer) and ``far-mesh infer`` (one-shot,
pipe-friendly): terminal clients of a coordinator, authenticated with an API key.

Both read ``FAR_MESH_URL`` (default http://127.0.0.1:8100) and ``FAR_MESH_API_KEY`` when ``--url`` / ``--api-key``
are not given (``far-mesh up`` writes both into ``<state dir>/mesh/mesh.env``). They stream the coordinator's
SSE (``POST /mesh/inference/generate``); closing the connection (Ctrl-C) cancels the generation there.

``infer`` writes only the generated text to stdout (so ``far-mesh infer --prompt ... > out.txt`` and pipes work);
the usage and cost line goes to stderr (``--quiet`` drops it). The prompt is ``--prompt`` or, when it is ``-`` or
absent and stdin is not a terminal, stdin. Exit codes: 0 done, 1 the request failed (the coordinator's message
on stderr), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from decimal import Decimal
from typing import Iterator, Optional

import typer

DEFAULT_URL = "http://127.0.0.1:8100"


class RequestFailed(Exception):
    pass


def _endpoint(url: Optional[str]) -> str:
    return (url or os.environ.get("FAR_MESH_URL") or DEFAULT_URL).rstrip("/")


def _key(api_key: Optional[str]) -> str:
    key = api_key or os.environ.get("FAR_MESH_API_KEY", "")
    if not key:
        typer.echo("far-mesh: no API key: pass --api-key fl_... or set FAR_MESH_API_KEY (far-mesh keys create "
                   "prints one; far-mesh up shows a ready one)", err=True)
        raise typer.Exit(2)
    return key


def stream_generate(url: str, api_key: str, payload: dict, *, timeout: float = 600) -> Iterator[dict]:
    """Yield the coordinator's events: {'token': ...} per token, then the final {'done': True, ...}."""
    import httpx
    from httpx_sse import EventSource

    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        with httpx.stream("POST", f"{url}/mesh/inference/generate", json={**payload, "stream": True},
                          headers=headers, timeout=httpx.Timeout(timeout, connect=10)) as response:
            if response.status_code != 200:
                response.read()
                try:
                    error = response.json()["error"]
                    message = f"{error.get('code', 'error')}: {error.get('message', '')}"
                except (ValueError, KeyError, TypeError):
                    message = response.text[:500]
                retry = response.headers.get("Retry-After")
                raise RequestFailed(f"HTTP {response.status_code} {message}"
                                    + (f" (retry after {retry} s)" if retry else ""))
            for sse in EventSource(response).iter_sse():
                data = sse.json()
                if sse.event == "error":
                    error = data.get("error", {})
                    raise RequestFailed(f"{error.get('code', 'error')}: {error.get('message', '')}")
                yield data
    except httpx.HTTPError as error:
        raise RequestFailed(f"cannot reach the coordinator at {url}: {type(error).__name__}: {error}") from None


def _payload(text: str, *, raw: bool, system: Optional[str], max_tokens: int, temperature: Optional[float],
             model: Optional[str], history: Optional[list] = None) -> dict:
    payload: dict = {"max_tokens": max_tokens}
    if raw:
        payload["prompt"] = text
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + list(history or [])
        payload["messages"] = messages + [{"role": "user", "content": text}]
    if temperature is not None:
        payload["temperature"] = temperature
    if model:
        payload["model_id"] = model
    return payload


def _usage_line(final: dict) -> str:
    usage = final.get("usage", {})
    return (f"[prompt {usage.get('prompt_tokens', 0)} + {usage.get('completion_tokens', 0)} tokens, "
            f"{final.get('finish_reason')}, cost {final.get('cost_far')} FAR]")


def infer(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="the prompt ('-' or absent: read stdin)"),
    max_tokens: int = typer.Option(100, "--max-tokens", "-n", min=1, help="tokens to generate at most"),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy (default: the model's recommended one)"),
    model: Optional[str] = typer.Option(None, "--model", help="model id (default: the coordinator's)"),
    raw: bool = typer.Option(False, "--raw", help="send the text as a raw prompt instead of a chat message"),
    system: Optional[str] = typer.Option(None, help="a system message (chat mode)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no usage/cost line on stderr"),
    url: Optional[str] = typer.Option(None, help=f"coordinator (default: FAR_MESH_URL or {DEFAULT_URL})"),
    api_key: Optional[str] = typer.Option(None, help="API key fl_... (default: FAR_MESH_API_KEY)"),
) -> None:
    """Generate once and stream the text to stdout (usage and cost on stderr)."""
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            typer.echo("far-mesh infer: give --prompt TEXT (or pipe the prompt into stdin)", err=True)
            raise typer.Exit(2)
        prompt = sys.stdin.read()
    if not prompt.strip():
        typer.echo("far-mesh infer: the prompt is empty", err=True)
        raise typer.Exit(2)
    key, endpoint = _key(api_key), _endpoint(url)
    payload = _payload(prompt, raw=raw, system=system, max_tokens=max_tokens, temperature=temperature, model=model)
    final = None
    try:
        for event in stream_generate(endpoint, key, payload):
            if event.get("done"):
                final = event
            else:
                sys.stdout.write(event["token"])
                sys.stdout.flush()
    except RequestFailed as error:
        sys.stdout.write("\n" if final is None and sys.stdout.isatty() else "")
        typer.echo(f"far-mesh infer: {error}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("\nfar-mesh infer: interrupted (the generation was cancelled)", err=True)
        raise typer.Exit(130) from None
    sys.stdout.write("\n")
    sys.stdout.flush()
    if final is not None and not quiet:
        typer.echo(_usage_line(final), err=True)


CHAT_HELP = "Type a message and Enter. /reset forgets the conversation, /exit (or Ctrl-D) quits; Ctrl-C stops an answer."


def chat(
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="tokens per answer at most"),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy (default: the model's recommended one)"),
    model: Optional[str] = typer.Option(None, "--model", help="model id (default: the coordinator's)"),
    system: Optional[str] = typer.Option(None, help="a system message for the whole conversation"),
    url: Optional[str] = typer.Option(None, help=f"coordinator (default: FAR_MESH_URL or {DEFAULT_URL})"),
    api_key: Optional[str] = typer.Option(None, help="API key fl_... (default: FAR_MESH_API_KEY)"),
) -> None:
    """Talk to a model through the mesh: multi-turn, streamed, with the cost of every answer."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False)
    key, endpoint = _key(api_key), _endpoint(url)
    history: list[dict] = []
    total = Decimal(0)
    console.print(f"[bold]far-mesh chat[/] with {endpoint}. {CHAT_HELP}")
    while True:
        try:
            text = console.input("[bold green]you> [/]")
        except (EOFError, KeyboardInterrupt):
            console.print()
            break
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history.clear()
            console.print("[dim](conversation forgotten)[/]")
            continue
        payload = _payload(text, raw=False, system=system, max_tokens=max_tokens, temperature=temperature,
                           model=model, history=history)
        console.print("[bold blue]assistant>[/] ", end="")
        answer, final = [], None
        try:
            for event in stream_generate(endpoint, key, payload):
                if event.get("done"):
                    final = event
                else:
                    answer.append(event["token"])
                    sys.stdout.write(event["token"])
                    sys.stdout.flush()
        except RequestFailed as error:
            console.print(f"\n[red]error: {error}[/]")
            continue
        except KeyboardInterrupt:
            console.print("\n[dim](answer stopped; the generation was cancelled)[/]")
            continue
        print()
        if final is not None:
            total += Decimal(str(final.get("cost_far") or 0))
            line = f"{_usage_line(final)[:-1]}, session total {total.normalize():f} FAR]"
            console.print(escape(line), style="dim")
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(answer)}]
    console.print(f"bye (spent {total.normalize():f} FAR)")
