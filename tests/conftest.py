import os

import pytest

# The tests' models are built locally (tiny toy, SmolLM2 from its PyPI wheel); never reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["tests.fixtures.db", "tests.fixtures.swarm"]

# Fixtures that start a Petals swarm (servers as subprocesses), or a coordinator on one. A test that uses any of them,
# directly or through another fixture, must be marked ``swarm``, so that ``pytest -m "not swarm"`` (the quick tier,
# README "Tests") never starts one. Modules that start swarms in their own fixtures or bodies (test_dashboard's
# stack, test_multihost's lab, LocalSwarm in a test) carry ``pytestmark = pytest.mark.swarm``.
SWARM_FIXTURES = frozenset({"swarm", "fresh_swarm", "half_swarm", "swarm_client", "coordinator",
                            "not_ready_coordinator", "real_swarm", "real_coordinator"})


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything: every collected test is checked
def pytest_collection_modifyitems(config, items):
    unmarked = sorted(item.nodeid for item in items
                      if SWARM_FIXTURES.intersection(getattr(item, "fixturenames", ()))
                      and item.get_closest_marker("swarm") is None)
    if unmarked:
        raise pytest.UsageError("these tests start a Petals swarm (fixtures " + ", ".join(sorted(SWARM_FIXTURES))
                                + ") but are not marked @pytest.mark.swarm:\n  " + "\n  ".join(unmarked))
