"""What ships: the far-mesh wheel holds every file the code loads at run time (migrations, contract artifacts,
the dashboard's static files), so an installed far-mesh needs no source checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from services.common.config import PROJECT_ROOT

PACKAGES = ("services", "node_server", "database", "infra")


def test_the_wheel_carries_the_package_data(tmp_path):
    source = tmp_path / "src"  # built from a copy: setuptools writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in PACKAGES:
        shutil.copytree(PROJECT_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                            str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("far_mesh-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())

    data_files = {path.relative_to(PROJECT_ROOT).as_posix()
                  for name in PACKAGES for path in (PROJECT_ROOT / name).rglob("*")
                  if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts}
    assert data_files, "no package data found: the check would pass vacuously"
    missing = sorted(data_files - shipped)
    assert not missing, f"files the code loads that an installed far-mesh would lack: {missing}"
    for expected in ("database/migrations/0001_initial.sql", "services/payouts/artifacts/FarPayout.json",
                     "services/discovery/static/provider.html", "services/discovery/static/vendor/chart.umd.min.js"):
        assert expected in shipped, expected


def test_the_provider_node_does_not_load_the_dev_harness():
    """far-node is what third parties install: it must not depend on infra/ (launchers for tests, bench, demo)."""
    probe = ("import sys, node_server.cli, node_server.agent, node_server.petals_server; "
             "print(sorted(m for m in sys.modules if m == 'infra' or m.startswith('infra.')))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[]", run.stdout
