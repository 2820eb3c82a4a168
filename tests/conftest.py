import os

# The tests' models are built locally (tiny toy, SmolLM2 from its PyPI wheel); never reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["tests.fixtures.db", "tests.fixtures.swarm"]
