"""The TypeScript SDK (sdk/typescript, ``@farlabs/sdk``) against live coordinators: builds it (``npm ci`` when
node_modules is missing or older than package-lock.json, ``npm run build``), then runs its Node test files (offline
unit tests, the live tests in test/live.test.mjs, and the React hook ``@farlabs/sdk/react`` rendered in jsdom in
test/react.test.mjs) with the coordinators' URLs and keys in the environment, and requires every test to pass and
none to be skipped."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.swarm import create_api_key

SDK_DIR = Path(__file__).resolve().parents[1] / "sdk" / "typescript"

pytestmark = [pytest.mark.swarm,
              pytest.mark.skipif(shutil.which("npm") is None or shutil.which("node") is None,
                                 reason="Node.js/npm not installed")]


def _npm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["npm", *args], cwd=SDK_DIR, capture_output=True, text=True, timeout=timeout)


def _node_modules_current() -> bool:
    """Every package of package-lock.json installed at its locked version (npm's own record of what it installed,
    node_modules/.package-lock.json): a checkout whose lock gained packages gets a fresh ``npm ci``."""
    installed = SDK_DIR / "node_modules" / ".package-lock.json"
    if not installed.is_file():
        return False
    locked = json.loads((SDK_DIR / "package-lock.json").read_text())["packages"]
    have = json.loads(installed.read_text()).get("packages", {})
    return all(have.get(path, {}).get("version") == entry.get("version")
               for path, entry in locked.items() if path.startswith("node_modules/"))


def _section(stdout: str, name: str) -> list[str]:
    """The names of the passed tests of the top-level ``describe(name)``; fails on a skipped one."""
    section = re.search(rf"^# Subtest: {re.escape(name)}\n(.*?)^ok \d+ - {re.escape(name)}", stdout, re.M | re.S)
    assert section, stdout[-4000:]
    assert "# SKIP" not in section.group(1), section.group(1)[-4000:]
    return re.findall(r"^    ok \d+ - (.+)$", section.group(1), re.M)


def test_typescript_sdk_live(coordinator, not_ready_coordinator, postgres_url):
    if not _node_modules_current():
        installed = _npm("ci", "--no-audit", "--no-fund")
        assert installed.returncode == 0, installed.stdout + installed.stderr
    built = _npm("run", "build")
    assert built.returncode == 0, built.stdout + built.stderr

    _, broke_key = asyncio.run(create_api_key(postgres_url, balance="0"))
    _, limited_key = asyncio.run(create_api_key(postgres_url, rate_limit=1))
    _, account_key = asyncio.run(create_api_key(postgres_url, balance="5"))  # balance()/usage(): used by nothing else
    # not_ready_coordinator: a swarm serving blocks 0:2 only, so 503 swarm_not_ready with missing_blocks [2, 3].
    env = dict(os.environ, FARLABS_TEST_BASE_URL=coordinator.url, FARLABS_TEST_API_KEY=coordinator.api_key,
               FARLABS_TEST_BROKE_KEY=broke_key, FARLABS_TEST_LIMITED_KEY=limited_key,
               FARLABS_TEST_ACCOUNT_KEY=account_key,
               FARLABS_TEST_NOT_READY_URL=not_ready_coordinator.url,
               FARLABS_TEST_NOT_READY_KEY=not_ready_coordinator.api_key)
    env.pop("FARLABS_API_KEY", None)
    env.pop("FARLABS_BASE_URL", None)
    # One file at a time: the live tests of test/live.test.mjs and test/react.test.mjs share one swarm and one
    # coordinator, so run serially none of them shares a batched pass or a cancel's timing with another file's
    # (the live files dominate the time either way: ~8 s both ways here).
    run = subprocess.run(["node", "--test", "--test-concurrency=1", "test/"], cwd=SDK_DIR, env=env,
                         capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    counts = {name: int(value) for name, value in re.findall(r"^# (tests|pass|fail|skipped|cancelled) (\d+)$",
                                                                 run.stdout, re.M)}
    assert counts.get("fail") == 0 and counts.get("skipped") == 0 and counts.get("cancelled") == 0, output[-6000:]
    assert counts.get("pass", 0) >= 34 and counts["pass"] == counts["tests"], (counts, output[-6000:])
    live = _section(run.stdout, "live coordinator")
    assert len(live) == 10, live
    # the React hook in a jsdom DOM against the live coordinator: streaming, a 402 in `error`, cancel(), unmount
    react = _section(run.stdout, "react useFarMesh (live coordinator)")
    assert len(react) == 4, react
