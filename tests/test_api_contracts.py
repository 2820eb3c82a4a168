"""API contracts (issue 12 item 16): schemathesis generates requests from each service's own OpenAPI document and
checks every answer against it (no 5xx, only documented status codes and content types, bodies matching their
schemas; schema-invalid input refused). The apps run in process (schemathesis' ASGI transport, no network) over
the real PostgreSQL and Redis; the coordinator's model is a fake (no swarm), so generation itself is not tested
here (tests/test_coordinator_*.py do that).
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from contextlib import asynccontextmanager
from decimal import Decimal
from types import SimpleNamespace

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (allow_header_conformance, content_type_conformance,
                                               negative_data_rejection, positive_data_acceptance,
                                               response_schema_conformance, status_code_conformance,
                                               unsupported_method)

from services.common.config import Settings, load_settings
from services.coordinator.engine import TokenDelta
from tests.fixtures.swarm import create_api_key

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection, positive_data_acceptance, unsupported_method, allow_header_conformance]
# Bounded: a few examples per operation keep both runs well under a minute on a 2-core box, derandomized so CI
# runs the same cases every time. CONTRACT_EXAMPLES=100 explores by hand: that many per operation, random ones.
EXPLORE = os.environ.get("CONTRACT_EXAMPLES")
BOUNDED = settings(max_examples=int(EXPLORE or 8), derandomize=not EXPLORE, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))
FAKE_MODEL_ID = "contract/fake"


# Refusals of schema-valid input for what no schema can state: a prompt's length in tokens (the model's context,
# 400 with these codes, documented), a logit_bias token id beyond its vocabulary (400) and a mixed-case wallet
# failing its EIP-55 checksum (422, in the schema's description). Only the positive-data check is waived for them; every other check still runs.
UNSTATEABLE = ("prompt_too_long", "max_tokens_exceeds_context", "EIP-55", "invalid_logit_bias")


def validate(case, headers=None) -> None:
    response = case.call(headers=headers)
    checks = CHECKS
    if response.status_code in (400, 422) and any(reason in response.text for reason in UNSTATEABLE):
        checks = [check for check in CHECKS if check is not positive_data_acceptance]
    case.validate_response(response, checks=checks, headers=headers)


class FakeGeneration:
    """An EngineGeneration (services/coordinator/engine_protocol.py): up to 3 tokens of "x", then ``length`` or
    ``eos``."""

    def __init__(self, params, cancel: threading.Event):
        self.params, self.cancel = params, cancel
        self.token_ids: list[int] = []
        self.finish_reason = None
        self.text = SimpleNamespace(emitted="")

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def route(self) -> list:
        return []

    def replaced_servers(self) -> list:
        return []

    def __iter__(self):
        for index in range(1, min(self.params.max_tokens, 3) + 1):
            if self.cancel.is_set():
                self.finish_reason = "cancelled"
                return
            self.token_ids.append(index)
            self.text.emitted += "x"
            yield TokenDelta(index, index, "x")
        self.finish_reason = "length" if self.params.max_tokens <= 3 else "eos"


class FakeTokenizer:
    chat_template = None

    def __len__(self) -> int:
        return 256  # one token per byte


class FakeModel:
    """A model without a swarm: one token per UTF-8 byte of the prompt, no chat template of its own."""

    model_id = FAKE_MODEL_ID
    context_length = 2048
    tokenizer = FakeTokenizer()

    def __init__(self):
        self.failure_listeners: list = []
        self.failover_listeners: list = []

    def encode(self, prompt: str) -> list[int]:
        return list(prompt.encode())

    def start(self, prompt_ids, params, meter, cancel=None):
        return FakeGeneration(params, cancel or threading.Event())

    def shutdown(self) -> None:
        pass


def coordinator_app(postgres_url: str, redis_url: str):
    """The coordinator's real HTTP app (app.http_app) with a lifespan that builds the real stores and rate limiter
    (in the loop schemathesis runs the app in) over FakeModel."""
    import asyncpg
    import redis.asyncio as aioredis

    from services.coordinator.accounts import AccountStore
    from services.coordinator.app import http_app
    from services.coordinator.ratelimit import RateLimiter
    from services.coordinator.serving import InferenceService
    from services.coordinator.store import Pricing, SessionStore

    @asynccontextmanager
    async def lifespan(app):
        app.state.pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=4)
        app.state.redis = aioredis.from_url(redis_url)
        app.state.service = InferenceService(
            store=SessionStore(app.state.pool), accounts=AccountStore(app.state.pool),
            limiter=RateLimiter(app.state.redis), models={FAKE_MODEL_ID: FakeModel()}, readiness={},
            default_model_id=FAKE_MODEL_ID, pricing=Pricing(Decimal("0.0001"), Decimal(0), 1000),
            coordinator_id=f"contracts-{uuid.uuid4().hex[:6]}", jwt_secret="", max_workers=2)
        try:
            yield
        finally:
            await app.state.service.aclose()
            await app.state.redis.aclose()
            await app.state.pool.close()

    return http_app(Settings(JWT_SECRET=""), lifespan=lifespan)


class Deferred:
    """An ASGI app whose real app is built by a fixture (it needs the test database's URL): schemathesis'
    pytest integration wants its schema at import time (its fixture-based loader does not run on pytest 9)."""

    def __init__(self, openapi_of):
        self.app = None
        self.schema = schemathesis.openapi.from_dict(openapi_of.openapi())
        self.schema.app = self

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


def _discovery_app(postgres_url: str = "postgresql://unused", redis_url: str = "redis://unused"):
    from services.discovery.app import create_app

    settings_ = load_settings(POSTGRES_URL=postgres_url, REDIS_URL=redis_url, FAR_MESH_DHT_BOOTSTRAP="",
                              DISCOVERY_CHALLENGES_PER_MINUTE=100_000)
    return create_app(settings_, models={"far-mesh/tiny": 4})


COORDINATOR = Deferred(coordinator_app("postgresql://unused", "redis://unused"))
DISCOVERY = Deferred(_discovery_app())
for _schema in (COORDINATOR.schema, DISCOVERY.schema):
    # A schema-violating body can also be refused for its size (413, before it is parsed): a rejection too.
    _rejection = _schema.config.checks.negative_data_rejection
    _rejection.expected_statuses = [*_rejection.expected_statuses, "413"]


@pytest.fixture(scope="module")
def contracts_db(make_database) -> str:
    """A database of its own: the generated requests leave sessions, keys and challenges behind."""
    return make_database()


# schemathesis' plugin ends an app's lifespan after each test item (each operation); the next item starts it again.
@pytest.fixture(scope="module")
def coordinator_key(contracts_db, redis_url):
    _, key = asyncio.run(create_api_key(contracts_db, balance="100000", rate_limit=100_000))
    COORDINATOR.app = coordinator_app(contracts_db, redis_url)
    yield key
    shutdown_lifespans()


@pytest.fixture(scope="module")
def discovery_app(contracts_db, redis_url):
    DISCOVERY.app = _discovery_app(contracts_db, redis_url)
    yield
    shutdown_lifespans()


@COORDINATOR.schema.parametrize()
@BOUNDED
def test_coordinator_api_matches_its_openapi(case, coordinator_key):
    # A real key: generated credentials would only ever meet the (documented) 401, tested in
    # tests/test_coordinator_api.py and tests/test_coordinator_hardening.py.
    validate(case, headers={"Authorization": f"Bearer {coordinator_key}"})


@DISCOVERY.schema.parametrize()
@BOUNDED
def test_discovery_api_matches_its_openapi(case, discovery_app):
    validate(case)


@pytest.mark.parametrize("service, method, path, allow", [
    ("coordinator", "OPTIONS", "/mesh/inference/req-1", "GET, DELETE"),  # two routes share the path
    ("coordinator", "PUT", "/mesh/account/keys", "GET, POST"),
    ("coordinator", "GET", "/mesh/inference/generate", "POST"),  # "generate" is not a request_id
    ("discovery", "OPTIONS", "/nodes/register", "POST"),
    ("discovery", "GET", "/nodes/unregister", "POST"),  # not a node ID: only UUIDs route to GET /nodes/{node_id}
])
def test_405_allow_names_every_method_of_the_path(service, method, path, allow):
    # No lifespan needed: the 405 is answered by routing, before any route runs.
    app = coordinator_app("postgresql://unused", "redis://unused") if service == "coordinator" else _discovery_app()

    async def call():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            return await client.request(method, path)

    response = asyncio.run(call())
    assert response.status_code == 405 and response.headers["allow"] == allow
    assert response.json()["error"]["code"] == "http_405"
