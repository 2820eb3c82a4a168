"""``far-mesh infer`` (one-shot, pipe-friendly) and ``far-mesh chat`` (interactive, in a terminal via pexpect)
against a live coordinator on a live swarm."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pexpect
import pytest

pytestmark = pytest.mark.swarm

CLI = [sys.executable, "-m", "services.cli"]


def env_for(coordinator, **extra) -> dict:
    return {**os.environ, "FAR_MESH_URL": coordinator.url, "FAR_MESH_API_KEY": coordinator.api_key, **extra}


def reference_text(coordinator, prompt: str, max_tokens: int) -> str:
    response = httpx.post(f"{coordinator.url}/mesh/inference/generate", headers=coordinator.headers, timeout=120,
                          json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": False})
    assert response.status_code == 200, response.text
    return response.json()["text"]


def test_infer_streams_only_the_text_to_stdout(coordinator):
    prompt = "def compute(a, b):"
    expected = reference_text(coordinator, prompt, 12)
    result = subprocess.run([*CLI, "infer", "--prompt", prompt, "--max-tokens", "12", "--temperature", "0", "--raw"],
                            env=env_for(coordinator), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert re.search(r"\[prompt \d+ \+ 12 tokens, length, cost 0\.0012 FAR\]", result.stderr), result.stderr

    # the prompt from a pipe, the key and URL as options, no usage line
    piped = subprocess.run([*CLI, "infer", "-n", "12", "--temperature", "0", "--raw", "-q", "--url", coordinator.url,
                            "--api-key", coordinator.api_key], input=prompt, env=dict(os.environ),
                           capture_output=True, text=True, timeout=180)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == expected + "\n" and piped.stderr == ""


def test_infer_failures_are_one_line_with_an_exit_code(coordinator):
    bad_key = subprocess.run([*CLI, "infer", "--prompt", "hi", "--api-key", "fl_not_a_key"],
                             env=env_for(coordinator), capture_output=True, text=True, timeout=60)
    assert bad_key.returncode == 1 and bad_key.stdout == ""
    assert "HTTP 401" in bad_key.stderr and "invalid API key" in bad_key.stderr
    too_many = subprocess.run([*CLI, "infer", "--prompt", "hi", "--max-tokens", "100000"],
                              env=env_for(coordinator), capture_output=True, text=True, timeout=60)
    assert too_many.returncode == 1 and "max_tokens" in too_many.stderr
    no_key = subprocess.run([*CLI, "infer", "--prompt", "hi"], env=env_for(coordinator, FAR_MESH_API_KEY=""),
                            capture_output=True, text=True, timeout=60)
    assert no_key.returncode == 2 and "FAR_MESH_API_KEY" in no_key.stderr


def test_chat_is_multi_turn_streamed_and_shows_the_cost_of_each_answer(coordinator, tmp_path):
    log = open(tmp_path / "chat.log", "w")
    child = pexpect.spawn(CLI[0], [*CLI[1:], "chat", "--max-tokens", "6", "--temperature", "0"],
                          env=env_for(coordinator), encoding="utf-8", timeout=120, dimensions=(40, 200), logfile=log)
    try:
        child.expect("you> ")
        child.sendline("Write a function.")
        child.expect(r"\[prompt (\d+) \+ 6 tokens, length, cost 0\.0006 FAR, session total 0\.0006 FAR\]")
        first_prompt = int(child.match.group(1))
        child.expect("you> ")
        child.sendline("And another one.")
        child.expect(r"\[prompt (\d+) \+ 6 tokens, length, cost 0\.0006 FAR, session total 0\.0012 FAR\]")
        assert int(child.match.group(1)) > first_prompt + 6  # the first turn and its answer went along
        child.expect("you> ")
        child.sendline("/reset")
        child.expect("conversation forgotten")
        child.expect("you> ")
        child.sendline("Write a function.")
        child.expect(r"\[prompt (\d+) \+ 6 tokens")
        assert int(child.match.group(1)) == first_prompt
        child.expect("you> ")
        child.sendeof()
        child.expect(r"bye \(spent 0\.0018 FAR\)")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
        log.close()
    assert child.exitstatus == 0
