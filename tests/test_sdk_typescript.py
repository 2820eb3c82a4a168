"""The TypeScript SDK (sdk/typescript, ``@farlabs/sdk``) against live coordinators: builds it (``npm ci`` when
node_modules is missing, ``npm run build``), then runs its Node test files (offline unit tests + the live tests in
test/live.test.mjs) with the coordinators' URLs and keys in the environment, and requires every test to pass and
none to be skipped."""

from __future__ import annotations

import asyncio
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


def test_typescript_sdk_live(coordinator, not_ready_coordinator, postgres_url):
    if not (SDK_DIR / "node_modules").is_dir():
        installed = _npm("ci", "--no-audit", "--no-fund")
        assert installed.returncode == 0, installed.stdout + installed.stderr
    built = _npm("run", "build")
    assert built.returncode == 0, built.stdout + built.stderr

    _, broke_key = asyncio.run(create_api_key(postgres_url, balance="0"))
    _, limited_key = asyncio.run(create_api_key(postgres_url, rate_limit=1))
    # not_ready_coordinator: a swarm serving blocks 0:2 only, so 503 swarm_not_ready with missing_blocks [2, 3].
    env = dict(os.environ, FARLABS_TEST_BASE_URL=coordinator.url, FARLABS_TEST_API_KEY=coordinator.api_key,
               FARLABS_TEST_BROKE_KEY=broke_key, FARLABS_TEST_LIMITED_KEY=limited_key,
               FARLABS_TEST_NOT_READY_URL=not_ready_coordinator.url,
               FARLABS_TEST_NOT_READY_KEY=not_ready_coordinator.api_key)
    env.pop("FARLABS_API_KEY", None)
    env.pop("FARLABS_BASE_URL", None)
    run = subprocess.run(["node", "--test", "test/"], cwd=SDK_DIR, env=env, capture_output=True, text=True,
                         timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    counts = {name: int(value) for name, value in re.findall(r"^# (tests|pass|fail|skipped|cancelled) (\d+)$",
                                                                 run.stdout, re.M)}
    assert counts.get("fail") == 0 and counts.get("skipped") == 0 and counts.get("cancelled") == 0, output[-6000:]
    assert counts.get("pass", 0) >= 28 and counts["pass"] == counts["tests"], counts
    section = re.search(r"^# Subtest: live coordinator\n(.*?)^ok \d+ - live coordinator", run.stdout, re.M | re.S)
    assert section, run.stdout[-4000:]
    live = re.findall(r"^    ok \d+ - (.+)$", section.group(1), re.M)
    assert len(live) == 8 and "# SKIP" not in section.group(1), section.group(1)[-4000:]
