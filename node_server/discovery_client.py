"""The node's side of the discovery API (docs/discovery.md).

Registration proves control of the peer ID: the node fetches a single-use nonce (``GET /nodes/challenge``),
signs ``registration_message(...)`` — every stored field, public_name and hardware included — with its libp2p
identity key and sends its public key; discovery checks the key hashes to the peer ID and the signature is valid.
A 429 on the challenge (rate limited) is retryable. Errors are JSON ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import httpx

from services.common.identity import NodeIdentity, registration_message


class DiscoveryError(Exception):
    """Base class: ``retryable`` tells whether trying again later may succeed."""

    retryable = True

    def __init__(self, message: str, *, status: Optional[int] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.code = status, code


class DiscoveryUnavailable(DiscoveryError):
    """Connection refused, timeout, 5xx: discovery is down or overloaded."""


class DiscoveryRefused(DiscoveryError):
    """4xx: discovery understood and said no (bad signature, bad wallet, unknown model...)."""


class NotRegistered(DiscoveryRefused):
    """401 on a node-token call: the token is unknown or expired; register again."""


@dataclass(frozen=True)
class Registration:
    node_id: str
    node_token: str
    heartbeat_interval_s: float
    start_block: int
    end_block: int


def _error_from(response: httpx.Response) -> DiscoveryError:
    code = message = None
    try:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            code, message = error.get("code"), error.get("message")
        elif isinstance(body, dict) and "detail" in body:
            message = str(body["detail"])
    except ValueError:
        pass
    text = f"HTTP {response.status_code}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    if response.status_code == 401:
        return NotRegistered(text, status=401, code=code)
    if response.status_code == 429:  # rate limited (e.g. challenges): try again later
        return DiscoveryUnavailable(text, status=429, code=code)
    if 400 <= response.status_code < 500:
        return DiscoveryRefused(text, status=response.status_code, code=code)
    return DiscoveryUnavailable(text, status=response.status_code, code=code)


class DiscoveryClient:
    def __init__(self, base_url: str, *, timeout: float = 5.0, transport: Optional[httpx.BaseTransport] = None):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, *, token: Optional[str] = None, **kwargs) -> dict:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            response = self._http.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as error:
            raise DiscoveryUnavailable(f"{self.base_url} unreachable: {error.__class__.__name__}: {error}") from None
        if response.status_code >= 400:
            raise _error_from(response)
        try:
            return response.json()
        except ValueError:
            raise DiscoveryUnavailable(f"{method} {path}: answer is not JSON") from None

    def challenge(self, peer_id: str) -> str:
        return str(self._request("GET", "/nodes/challenge", params={"peer_id": peer_id})["nonce"])

    def register(self, identity: NodeIdentity, *, wallet_address: str, model_id: str, start_block: int,
                 end_block: int, public_name: Optional[str], hardware: dict) -> Registration:
        nonce = self.challenge(identity.peer_id)
        hardware = {name: value for name, value in hardware.items() if value is not None}
        message = registration_message(nonce=nonce, peer_id=identity.peer_id, wallet_address=wallet_address,
                                       model_id=model_id, start_block=start_block, end_block=end_block,
                                       public_name=public_name, hardware=hardware)
        body = {
            "peer_id": identity.peer_id,
            "wallet_address": wallet_address,
            "model_id": model_id,
            "start_block": start_block,
            "end_block": end_block,
            "public_name": public_name,
            "hardware": hardware,
            "public_key": identity.public_key_b64,
            "signature": identity.sign(message),
            "nonce": nonce,
        }
        answer = self._request("POST", "/nodes/register", json=body)
        return Registration(str(answer["node_id"]), str(answer["node_token"]),
                            float(answer.get("heartbeat_interval_s") or 30), start_block, end_block)

    def heartbeat(self, token: str, *, state: Optional[str] = None, tokens_served: Optional[int] = None,
                  vram_used_gb: Optional[float] = None, gpu_temp_c: Optional[float] = None) -> dict:
        body = {"state": state, "tokens_served": tokens_served, "vram_used_gb": vram_used_gb,
                "gpu_temp_c": gpu_temp_c}
        return self._request("POST", "/nodes/heartbeat", token=token,
                             json={k: v for k, v in body.items() if v is not None})

    def unregister(self, token: str) -> dict:
        return self._request("POST", "/nodes/unregister", token=token)

    def node(self, node_id: str) -> dict:
        return self._request("GET", f"/nodes/{node_id}")

    def node_by_peer(self, peer_id: str) -> dict:
        return self._request("GET", f"/nodes/by-peer/{peer_id}")

    def active_nodes(self) -> list[dict]:
        answer = self._request("GET", "/nodes/active")
        if isinstance(answer, dict):
            answer = answer.get("nodes", [])
        return list(answer)

    def models(self) -> dict[str, Optional[int]]:
        """Model ids discovery knows, with their block counts: ``GET /models``, else the active nodes' models."""
        try:
            answer = self._request("GET", "/models")
            return {m["model_id"]: m.get("num_blocks") for m in answer.get("models", []) if m.get("model_id")}
        except DiscoveryRefused:  # an older discovery without GET /models
            pass
        models: dict[str, Optional[int]] = {}
        for node in self.active_nodes():
            if isinstance(node, dict) and node.get("model_id"):
                models.setdefault(node["model_id"], None)
        return models

    def known_models(self) -> list[str]:
        return list(self.models())

    def expected_blocks(self, model_id: str) -> Optional[int]:
        try:
            return self.models().get(model_id)
        except DiscoveryError:
            return None
