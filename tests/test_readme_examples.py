"""The README's curl example, run verbatim (but for the key and the URL) against a live coordinator: curl's
``-d`` sends ``Content-Type: application/x-www-form-urlencoded``, and the generate endpoint reads the body as JSON
anyway. A body that is not JSON at all gets a 422 that names the fix."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.swarm

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_curl() -> str:
    match = re.search(r"^```bash\n(curl -N [^\n]+)\n```", README.read_text(), re.M)
    assert match, "the README's curl example"
    return match.group(1)


def run(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)


def test_the_readme_curl_example_works_verbatim(coordinator):
    command = readme_curl().replace("fl_...", coordinator.api_key).replace("http://127.0.0.1:8100", coordinator.url)
    assert "Content-Type" not in command  # curl's default form content type
    result = run(command)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line[len("data: "):]) for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert events and events[-1]["done"] is True, result.stdout
    assert events[-1]["usage"]["completion_tokens"] >= 1
    assert "".join(e.get("token", "") for e in events[:-1])


def test_a_body_that_is_not_json_gets_a_message_naming_the_fix(coordinator):
    result = run(f"curl -sS -w '\\n%{{http_code}}' -H {shlex.quote('Authorization: Bearer ' + coordinator.api_key)} "
                 f"-d 'prompt=Hello&max_tokens=8' {coordinator.url}/mesh/inference/generate")
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "422"
    message = json.loads(body)["error"]["message"]
    assert "not JSON" in message and '{"prompt": "Hello", "max_tokens": 64}' in message
    assert "any Content-Type is accepted" in message
