"""Each service reads only its own settings class (services/common/config.py): a value of another service's
variable can never stop it, and a setting a service reads but its class lacks is caught here, not in production
(the tests mostly build the all-in-one ``Settings``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from services.common.config import (
    CommonSettings,
    CoordinatorSettings,
    DiscoverySettings,
    NodeSettings,
    PayoutSettings,
    Settings,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[1]
OWNERS = [("services/coordinator", CoordinatorSettings), ("services/discovery", DiscoverySettings),
          ("services/payouts", PayoutSettings), ("services/deposits", PayoutSettings),
          ("services/dht", CommonSettings), ("node_server", NodeSettings)]


def _names(kind) -> set[str]:
    return set(kind.model_fields) | {name for name in dir(kind) if isinstance(getattr(kind, name, None), property)}


def _settings_reads(folder: Path) -> set[tuple[str, str]]:
    """(file, NAME) for every ``<...settings>.NAME`` in upper case (a setting) read in ``folder``."""
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.isupper():
                owner = node.value
                name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                if name.endswith("settings") or (isinstance(owner, ast.Call) and
                                                 getattr(owner.func, "id", "").endswith("settings")):
                    found.add((path.relative_to(ROOT).as_posix(), node.attr))
    return found


@pytest.mark.parametrize("folder,kind", OWNERS, ids=[folder for folder, _ in OWNERS])
def test_a_service_reads_only_its_own_settings(folder, kind):
    reads = _settings_reads(ROOT / folder)
    assert reads, f"no settings read found in {folder}: the scan would pass vacuously"
    missing = sorted((file, name) for file, name in reads if name not in _names(kind))
    assert not missing, f"read but not in {kind.__name__}: {missing}"


def test_settings_is_every_service_class_and_they_stay_independent(monkeypatch):
    assert all(issubclass(Settings, kind) for _, kind in OWNERS)
    union = set().union(*(kind.model_fields for _, kind in OWNERS))
    assert set(Settings.model_fields) == union  # nothing that belongs to no service
    monkeypatch.setenv("MIN_PAYOUT_FAR", "-1")  # a bad payout value stops the tracker, not the coordinator
    coordinator = load_settings(CoordinatorSettings)
    assert not hasattr(coordinator, "MIN_PAYOUT_FAR")
    with pytest.raises(SystemExit):
        load_settings(PayoutSettings)
