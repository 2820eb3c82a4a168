"""The one settings module: every environment variable of the services (README "Configuration").

Read with pydantic-settings. A missing or malformed value fails at start with one clear line naming the
variable (see :func:`load_settings`). Money values are ``Decimal`` (never float).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.common.proxies import parse_networks

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def default_state_dir() -> Path:
    """Where embedded services, the demo model and identity files live (``FAR_MESH_STATE_DIR`` overrides)."""
    return Path(os.environ.get("FAR_MESH_STATE_DIR", PROJECT_ROOT / ".far-mesh")).resolve()


# Words of the placeholders that example files and docs put where a secret goes (deploy/env.example): a value
# containing one was copied, not generated.
PLACEHOLDER_MARKERS = ("change-me", "changeme", "change_me", "replace-me", "replaceme", "replace_me", "placeholder",
                       "example", "your-secret", "your_secret", "secret-here", "<", ">")


def placeholder_problem(name: str, value: str) -> str | None:
    """Why ``value`` of the secret ``name`` is a copied placeholder rather than a secret (None when it is not)."""
    lowered = value.lower()
    marker = next((m for m in PLACEHOLDER_MARKERS if m in lowered), None)
    if marker is not None:
        return f"{name} is a placeholder (contains {marker!r}); generate a secret"
    if value and len(set(value)) < 8:
        return f"{name} has fewer than 8 distinct characters; generate a secret"
    return None


def _finite_non_negative(value: Decimal) -> Decimal:
    if value < 0 or not value.is_finite():
        raise ValueError("must be a finite, non-negative decimal")
    return value


class FallbackEndpoint(BaseModel):
    """An upstream OpenAI-compatible API that serves a model while its swarm cannot (docs/fallback.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(pattern=r"^https?://\S+$", description="base URL of the API, e.g. http://127.0.0.1:8000/v1")
    api_key: str = Field(default="", repr=False, description="sent as 'Authorization: Bearer …' when not empty")
    model: str = Field(default="", description="the model's name upstream (default: the coordinator's model id)")
    price_per_token_far: Decimal = Field(description="what the user pays per generated token when served upstream")
    price_per_prompt_token_far: Decimal = Decimal("0")
    timeout_s: float = Field(default=60.0, gt=0, description="connect, and wait for each chunk, at most this long")

    @field_validator("price_per_token_far", "price_per_prompt_token_far")
    @classmethod
    def _price(cls, value: Decimal) -> Decimal:
        value = _finite_non_negative(value)
        if value.scaleb(18) != value.scaleb(18).to_integral_value():  # the books hold 1e-18 FAR (numeric(38,18))
            raise ValueError("has more than 18 decimals")
        return value


class CommonSettings(BaseSettings):
    """What every part reads: where the swarm, the databases and the model are, and the prices (one money rule for
    the coordinator that charges and the tracker's audit that checks). Each service has its own class on this base,
    so a bad value of another service's variable never stops it; ``Settings`` is all of them (CLIs, the dev mesh)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=True, extra="ignore", frozen=True)

    FAR_MESH_DHT_BOOTSTRAP: str = Field(default="", description="comma-separated multiaddrs of DHT bootstrap peers")
    POSTGRES_URL: str = "postgresql://postgres@127.0.0.1:5432/test"
    REDIS_URL: str = "redis://127.0.0.1:6379/0"
    DEFAULT_MODEL_ID: str = "far-mesh/smollm2-135m-instruct"
    PRICE_PER_TOKEN_FAR: Decimal = Decimal("0.0001")
    PRICE_PER_PROMPT_TOKEN_FAR: Decimal = Decimal("0")
    PLATFORM_FEE_BPS: int = Field(default=1000, ge=0, le=10000)
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Not in SPEC's list, documented in docs/configuration.md.
    FAR_MESH_STATE_DIR: Path = Field(default_factory=default_state_dir)
    FAR_MESH_MODEL_PATH: str = Field(default="", description="local directory of DEFAULT_MODEL_ID (default: built "
                                     "from the catalog, or downloaded from the hub)")

    # Circuit relays (docs/multihost.md "Providers behind NAT (relays)"): what a reachable peer (the bootstrap, a
    # provider) spends relaying for peers behind NAT.
    FAR_MESH_RELAY_MAX_RESERVATIONS: int = Field(default=128, ge=0, description="peers it holds a relay slot for")
    FAR_MESH_RELAY_MAX_CIRCUITS: int = Field(default=16, ge=0, description="relayed connections per peer")
    FAR_MESH_RELAY_TIME_LIMIT_S: int = Field(default=3600, gt=0, description="one relayed connection's longest life")
    FAR_MESH_RELAY_DATA_LIMIT_MB: int = Field(default=4096, gt=0, description="bytes relayed per connection and "
                                              "direction before it is reset (MiB)")
    FAR_MESH_RELAYS: str = Field(default="", description="comma-separated multiaddrs of extra relays a peer behind "
                                 "NAT may use (the DHT bootstrap peers always are)")

    _non_negative = field_validator("PRICE_PER_TOKEN_FAR", "PRICE_PER_PROMPT_TOKEN_FAR")(_finite_non_negative)

    @field_validator("POSTGRES_URL")
    @classmethod
    def _no_placeholder_password(cls, value: str) -> str:
        """The database password of deploy/env.example must be replaced, not deployed."""
        try:
            password = urlsplit(value).password
        except ValueError:
            return value
        problem = placeholder_problem("the password in POSTGRES_URL", password) if password else None
        if problem:
            raise ValueError(problem)
        return value

    @property
    def initial_peers(self) -> list[str]:
        return [peer.strip() for peer in self.FAR_MESH_DHT_BOOTSTRAP.split(",") if peer.strip()]


class NodeSettings(CommonSettings):
    """far-node (flags and its config file override these)."""

    DISCOVERY_URL: str = "http://127.0.0.1:8200"


class ChainSettings(CommonSettings):
    """The chain and the FAR contracts: the payment tracker pays through them, the deposit watcher reads them and
    the coordinator tells users where to deposit."""

    BSC_NETWORK: Literal["local", "testnet", "mainnet"] = "local"
    BSC_RPC_URL: str = ""
    FAR_TOKEN_ADDRESS: str = ""
    PAYOUT_CONTRACT_ADDRESS: str = ""
    # Deposits (docs/accounts.md): the FarDeposit contract users call, where its watcher starts, how often it polls.
    DEPOSIT_CONTRACT_ADDRESS: str = Field(default="", description="FarDeposit contract (deposit(accountRef, amount))")
    DEPOSIT_START_BLOCK: int = Field(default=0, ge=0, description="first block the deposit watcher scans (deployment)")
    DEPOSIT_POLL_INTERVAL_S: float = Field(default=15.0, gt=0, description="seconds between deposit watcher scans")
    PAYOUT_CONFIRMATIONS: int = Field(default=3, ge=0)

    @model_validator(mode="after")
    def _confirmations_on_public_chains(self):
        problem = confirmations_problem(self.BSC_NETWORK, self.PAYOUT_CONFIRMATIONS)
        if problem:
            raise ValueError(problem)
        return self


# On a public chain a credited deposit or a confirmed payout must not be undone by an ordinary reorg.
MIN_PUBLIC_CONFIRMATIONS = 3


def confirmations_problem(network: str, confirmations: int) -> str | None:
    """Why ``confirmations`` is too few for ``network`` (None when it is enough). Checked by the settings and again
    where a command names its own ``--network``."""
    if network in ("testnet", "mainnet") and confirmations < MIN_PUBLIC_CONFIRMATIONS:
        return (f"PAYOUT_CONFIRMATIONS: {confirmations} is too few on {network}; at least "
                f"{MIN_PUBLIC_CONFIRMATIONS} (a shallow reorg would undo a credited deposit or a confirmed payout)")
    return None


class PayoutSettings(ChainSettings):
    """The payment tracker (`far-mesh payouts`, `far-mesh audit`, `far-mesh deposits`)."""

    MIN_PAYOUT_FAR: Decimal = Decimal("10")
    PAYOUT_KEYSTORE: str = ""
    PAYOUT_KEYSTORE_PASSWORD_FILE: str = ""
    PAYOUT_PRIVATE_KEY: str = ""
    # Payouts tuning (not in SPEC's list, documented in docs/payouts.md).
    MAX_RECIPIENTS_PER_TX: int = Field(default=200, ge=1, le=1000, description="recipients per payBatch transaction")
    PAYOUT_MAX_GAS: int = Field(default=10_000_000, ge=100_000, description="gas limit cap of one payBatch transaction")
    PAYOUT_FINALITY_BLOCKS: int = Field(default=64, ge=1, description="a confirmed batch's payment is re-read by "
                                        "every run until it is this deep (and, on BSC, in a `finalized` block); a "
                                        "reorg that removed it before then sends it again with the same batchId")

    _non_negative_minimum = field_validator("MIN_PAYOUT_FAR")(_finite_non_negative)


class CoordinatorSettings(ChainSettings):
    """The mesh coordinator."""

    # HS256 secret of user JWTs; empty = JWT authentication off (API keys only). The coordinator refuses to start
    # with a secret shorter than 32 bytes or the old published development value (docs/generation.md).
    JWT_SECRET: str = ""
    ACCOUNT_MAX_API_KEYS: int = Field(default=50, ge=1, description="active API keys an account may hold")
    ACCOUNT_KEY_CREATIONS_PER_DAY: int = Field(default=20, ge=1, description="API keys an account may create in 24 "
                                               "hours (revoked ones count)")
    ACCOUNT_RATE_LIMIT_PER_MINUTE: int = Field(default=1200, ge=1, description="requests per minute of one account, "
                                               "all of its keys together (each key also has its own limit)")
    PETALS_REQUEST_TIMEOUT_S: float = Field(default=30.0, gt=0)
    FAR_MESH_CORS_ORIGINS: str = Field(default="*", description="origins allowed to call the coordinator from a "
                                       "browser (comma-separated; '' = none)")
    FAR_MESH_COORDINATOR_ID: str = Field(default="", description="stable id of this coordinator (default host:port)")
    PETALS_MAX_RETRIES: int = Field(default=6, ge=1)
    PETALS_STEP_BUDGET_FACTOR: float = Field(default=5.0, ge=0, description="coordinator: a server step not answered "
                                             "within max(floor, factor x that server's p99 step time) is retried "
                                             "on a replica (0 = only PETALS_REQUEST_TIMEOUT_S)")
    PETALS_STEP_BUDGET_FLOOR_S: float = Field(default=1.0, gt=0, description="coordinator: the step budget's floor")
    LM_HEAD_MAX_WAIT_S: float = Field(default=0.5, ge=0, le=10, description="coordinator: an LM-head pass waits "
                                      "at most this long for the concurrent generations it expects (keeps streams "
                                      "in phase so servers batch them; docs/batching.md; 0 = no waiting)")
    TORCH_THREADS: int = Field(default=1, ge=1, le=256, description="coordinator: torch threads for the embeddings, "
                               "LM head and sampling (1: measured fastest when servers share the host, and the LM "
                               "head of concurrent generations is one memory-bound pass; raise it on a dedicated "
                               "host serving a large model)")
    GENERATION_TIMEOUT_S: float = Field(default=600.0, gt=0)
    PREFIX_REUSE_TTL_S: float = Field(default=120.0, ge=0, le=240, description="coordinator: a finished "
                                      "generation's inference session stays open this long for its account's next "
                                      "request that starts with the same tokens (prefix reuse, docs/prefix-reuse.md; "
                                      "0 = off; at most 240 s: servers end a session idle for 5 minutes)")
    PREFIX_REUSE_MAX_SESSIONS: int = Field(default=0, ge=0, description="coordinator: parked sessions kept at "
                                           "most (least recently used closed first; 0 = prefix reuse off, the "
                                           "default: parked and reusable sessions hold servers' attention cache, "
                                           "which servers do not evict under pressure; docs/prefix-reuse.md)")
    PREFIX_REUSE_MAX_TOKENS: int = Field(default=4096, ge=0, description="coordinator: attention-cache positions "
                                         "the parked sessions may hold on each server of their routes, in all "
                                         "(the sum of their max_length; 0 = prefix reuse off)")
    PREFIX_REUSE_HEADROOM_TOKENS: int = Field(default=256, ge=0, description="coordinator: a session that may be "
                                              "reused is opened with room for this many positions (or as many as "
                                              "its own, if more; within PREFIX_REUSE_MAX_TOKENS and the context) "
                                              "beyond prompt + max_tokens, for the next turns")
    SPOT_CHECK_RATE: float = Field(default=0.03, ge=0, le=1, description="coordinator: share of server steps "
                                   "re-run on another server to check them (0 = off; docs/verification.md)")
    SPOT_CHECK_NEW_NODE_RATE: float = Field(default=0.25, ge=0, le=1, description="coordinator: the rate for a "
                                            "server without a clean record (fewer than SPOT_CHECK_CLEAN_RECORD "
                                            "passed checks since its last failure)")
    SPOT_CHECK_CLEAN_RECORD: int = Field(default=20, ge=0)
    SPOT_CHECK_QUEUE: int = Field(default=32, ge=1, description="coordinator: sampled steps waiting for a check; "
                                  "beyond it they are dropped (a check never slows a stream)")
    SPOT_CHECK_QUARANTINE_AFTER: int = Field(default=2, ge=1, description="coordinator: failed checks that "
                                             "quarantine a peer")
    SPOT_CHECK_TRUSTED_VERIFIER_GB: float = Field(default=2.0, ge=0, description="coordinator: memory for the "
                                                  "trusted verifier, the coordinator recomputing a span from its "
                                                  "own model files to settle disagreements and check spans no "
                                                  "other server holds (0 = none; docs/verification.md)")
    SPOT_CHECK_TRUSTED_PEERS: str = Field(default="", description="coordinator: comma-separated peer IDs of "
                                          "operator-run servers whose outputs settle disagreements like the "
                                          "coordinator's own recomputation (for spans it cannot hold)")
    SPOT_CHECK_RETRY_S: float = Field(default=30.0, gt=0, description="coordinator: how often an inconclusive "
                                      "check (its contribution held unpaid) is tried again")
    SPOT_CHECK_QUARANTINE_SYNC_S: float = Field(default=10.0, gt=0, description="coordinator: how often it re-reads "
                                                "the quarantine (other coordinators' quarantines, lifts)")
    MAX_RUNNING_GENERATIONS: int = Field(default=16, ge=1, description="coordinator: generations running at once "
                                         "per model (docs/generation.md \"Concurrency\")")
    MAX_QUEUED_GENERATIONS: int = Field(default=32, ge=0, description="coordinator: generations waiting for a "
                                        "running slot per model; more get 503 overloaded")
    MAX_QUEUE_WAIT_S: float = Field(default=10.0, ge=0, description="coordinator: longest wait for a running "
                                    "slot before 503 overloaded")
    OVERLOADED_RETRY_AFTER_S: int = Field(default=2, ge=1, description="Retry-After of 503 overloaded")
    SESSION_SWEEP_INTERVAL_S: float = Field(default=60.0, gt=0, description="coordinator: stale-session sweep period")
    SESSION_STALE_AFTER_S: float = Field(default=0.0, ge=0, description="a running session not updated this long is "
                                         "finalized 'interrupted' (0 = GENERATION_TIMEOUT_S + 120)")
    MAX_REQUEST_BODY_BYTES: int = Field(default=1024 * 1024, ge=1024, description="coordinator: larger bodies get 413")
    SWARM_READINESS_REFRESH_S: float = Field(default=2.0, gt=0)
    # Fallback to centralized inference (docs/fallback.md): {"<model_id>": {"url", "api_key", "model",
    # "price_per_token_far", "price_per_prompt_token_far", "timeout_s"}}; empty = off.
    FALLBACK_ENDPOINTS: Annotated[dict[str, FallbackEndpoint], NoDecode] = Field(default_factory=dict)

    @field_validator("FALLBACK_ENDPOINTS", mode="before")
    @classmethod
    def _json_object(cls, value):
        """Decoded here, not by pydantic-settings, so bad JSON is a ValidationError (one clear line)."""
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                value = json.loads(value, parse_float=Decimal)  # money stays exact: never a float
            except json.JSONDecodeError as error:
                raise ValueError(f"not JSON ({error.msg} at character {error.pos})") from None
        return value

    @property
    def stale_session_after_s(self) -> float:
        return self.SESSION_STALE_AFTER_S or self.GENERATION_TIMEOUT_S + 120.0

    @property
    def cors_origins(self) -> list[str]:
        return [origin.strip() for origin in self.FAR_MESH_CORS_ORIGINS.split(",") if origin.strip()]


class DiscoverySettings(CommonSettings):
    """The discovery service (tuning documented in docs/discovery.md)."""

    NODE_HEARTBEAT_TTL_S: float = Field(default=90.0, gt=0, description="a node without a heartbeat this long is not active")
    DISCOVERY_DHT_REFRESH_S: float = Field(default=10.0, gt=0, description="seconds between DHT swarm-state reads")
    DISCOVERY_REACHABILITY_INTERVAL_S: float = Field(
        default=60.0, ge=0, description="seconds between discovery's dials of each announced server (0 = off)")
    DISCOVERY_FLUSH_INTERVAL_S: float = Field(default=5.0, gt=0, description="heartbeat write-behind to Postgres")
    JOINING_TOO_LONG_S: float = Field(default=300.0, gt=0, description="a server JOINING longer than this is reported")
    DISCOVERY_MODELS: str = Field(default="", description="more models discovery knows: model_id=num_blocks,...")
    DISCOVERY_CHALLENGES_PER_MINUTE: int = Field(default=30, ge=1, le=100_000,
                                                 description="GET /nodes/challenge per client address per minute")
    DISCOVERY_CHALLENGES_PER_PEER_PER_MINUTE: int = Field(default=10, ge=1, le=100_000,
                                                          description="GET /nodes/challenge per peer ID per minute")
    DISCOVERY_TRUSTED_PROXIES: str = Field(default="", description="comma-separated addresses/networks of reverse "
                                           "proxies whose X-Forwarded-For names the client ('' = none: the TCP peer "
                                           "is the client)")

    @field_validator("DISCOVERY_TRUSTED_PROXIES")
    @classmethod
    def _networks(cls, value: str) -> str:
        parse_networks(value)
        return value


class Settings(CoordinatorSettings, PayoutSettings, DiscoverySettings, NodeSettings):
    """Every setting: for the CLIs that drive several parts, the local mesh and the tests."""


S = TypeVar("S", bound=CommonSettings)


class ConfigError(SystemExit):
    """Raised (as a clean exit) when the environment holds a bad value."""


def _explain(error: ValidationError) -> str:
    first = error.errors()[0]
    name = ".".join(str(part) for part in first["loc"]) or "?"
    got = os.environ.get(name)
    secret = any(word in name for word in ("SECRET", "KEY", "FALLBACK"))  # FALLBACK_ENDPOINTS holds API keys
    shown = f" (got {got!r})" if got is not None and not secret else ""
    return f"far-mesh: configuration error: {name}: {first['msg']}{shown}"


def load_settings(kind: type[S] | None = None, **overrides) -> S:
    """Build ``kind`` (default: all of ``Settings``) from the environment; on a bad value exit with one line naming
    the variable."""
    try:
        return (kind or Settings)(**overrides)
    except ValidationError as error:
        line = _explain(error)
        print(line, file=sys.stderr)
        raise ConfigError(2) from None


@functools.lru_cache(maxsize=None)
def get_settings(kind: type[S] | None = None) -> S:
    """The process's settings of ``kind`` (default ``Settings``), read once."""
    return load_settings(kind)
