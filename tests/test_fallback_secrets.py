"""A fallback endpoint's credentials (user info, a key in the query, the API key) and the upstream's own error text
never reach a user's error message, and the credentials never reach the log."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import pytest

from services.common.config import FallbackEndpoint
from services.coordinator.fallback import FallbackClient, FallbackFailed
from services.coordinator.protocol import GenerateRequest

SECRETS = ("pa55word", "qs-secret", "sk-live-123", "hunter2", "fb-user")
UPSTREAM_ERROR = {"error": {"message": "pool postgres://admin:hunter2@10.0.0.5 down; key sk-live-123 refused"}}


async def _serve(status_line: bytes, body: bytes):
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(status_line + b"\r\ncontent-type: application/json\r\ncontent-length: "
                     + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _client(port: int) -> FallbackClient:
    endpoint = FallbackEndpoint(url=f"http://fb-user:pa55word@127.0.0.1:{port}/v1?api_key=qs-secret",
                                api_key="sk-live-123", price_per_token_far=Decimal("0.001"), timeout_s=5)
    return FallbackClient(endpoint, "test/fake")


def _assert_clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, (secret, text)


@pytest.mark.parametrize("reachable", [True, False])
async def test_credentials_and_upstream_text_stay_out_of_errors_and_logs(capsys, reachable):
    server, port = await _serve(b"HTTP/1.1 500 Internal Server Error", json.dumps(UPSTREAM_ERROR).encode())
    if not reachable:
        server.close()
        await server.wait_closed()
    client = _client(port)
    try:
        with pytest.raises(FallbackFailed) as failed:
            await client.open(GenerateRequest(prompt="hi", max_tokens=2))
    finally:
        await client.aclose()
        server.close()
    message = failed.value.message
    _assert_clean(message)
    assert f"http://127.0.0.1:{port}" in message
    assert ("HTTP 500" in message and "pool" not in message) if reachable else "could not be reached" in message
    logged = capsys.readouterr()
    _assert_clean(logged.out + logged.err)
    if reachable:  # the operator still sees what the upstream said, minus the credentials
        assert "pool postgres://<redacted>@10.0.0.5 down" in logged.out + logged.err


async def test_in_band_stream_error_is_summarized(capsys):
    event = b"data: " + json.dumps(UPSTREAM_ERROR).encode() + b"\n\n"

    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n" + event)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    client = _client(server.sockets[0].getsockname()[1])
    try:
        response = await client.open(GenerateRequest(prompt="hi", max_tokens=2))
        with pytest.raises(FallbackFailed) as failed:
            async for _ in client.chunks(response):
                pass
    finally:
        await client.aclose()
        server.close()
    assert failed.value.message == "the fallback API failed mid-stream"
    logged = capsys.readouterr()
    _assert_clean(logged.out + logged.err + failed.value.message)
