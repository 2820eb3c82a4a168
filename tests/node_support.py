"""Test helpers for the provider node: a fake discovery service that follows the SPEC contract (and verifies
signatures like the real one must), and a stand-in for the Petals server child."""

from __future__ import annotations

import json
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from services.common.identity import registration_message, verify_signature

FAKE_SERVER = Path(__file__).with_name("node_fake_server.py")


class FakeDiscovery:
    """In-process HTTP server speaking the discovery contract of SPEC.md (only what the node uses)."""

    def __init__(self, port: int = 0, heartbeat_interval_s: float = 30):
        self.nodes: dict[str, dict] = {}  # node_id -> record
        self.tokens: dict[str, str] = {}  # token -> node_id
        self.nonces: dict[str, str] = {}  # nonce -> peer_id
        self.calls: list[tuple[str, str, dict]] = []
        self.heartbeat_interval_s = heartbeat_interval_s
        self.fail_with: int | None = None  # answer every request with this status (e.g. 503)
        self.models: dict[str, int] | None = None  # GET /models (None: 404, like an older discovery)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"{}") if length else {}

            def _dispatch(self, method: str):
                url = urlparse(self.path)
                body = self._body() if method == "POST" else {}
                with fake.lock:
                    fake.calls.append((method, url.path, body))
                    if fake.fail_with:
                        return self._send(fake.fail_with, {"error": {"code": "unavailable", "message": "down"}})
                    status, answer = fake.handle(method, url.path, parse_qs(url.query), body,
                                                 self.headers.get("Authorization", ""))
                self._send(status, answer)

            def do_GET(self):
                self._dispatch("GET")

            def do_POST(self):
                self._dispatch("POST")

        from services.common.identity import _crypto_pb2

        _crypto_pb2()  # import hivemind (and torch) now, not inside the first register request (~5 s)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def error(status: int, code: str, message: str):
        return status, {"error": {"code": code, "message": message}}

    def node_for(self, auth: str):
        token = auth.removeprefix("Bearer ").strip()
        node_id = self.tokens.get(token)
        return self.nodes.get(node_id) if node_id else None

    def handle(self, method, path, query, body, auth):
        if method == "GET" and path == "/nodes/challenge":
            nonce = secrets.token_hex(16)
            self.nonces[nonce] = query["peer_id"][0]
            return 200, {"nonce": nonce, "expires_in_s": 300}
        if method == "POST" and path == "/nodes/register":
            nonce = body.get("nonce")
            if self.nonces.pop(nonce, None) != body.get("peer_id"):
                return self.error(401, "bad_nonce", "unknown or used nonce")
            message = registration_message(nonce=nonce, peer_id=body["peer_id"],
                                           wallet_address=body["wallet_address"], model_id=body["model_id"],
                                           start_block=body["start_block"], end_block=body["end_block"],
                                           public_name=body.get("public_name"), hardware=body.get("hardware"))
            if not verify_signature(peer_id=body["peer_id"], public_key_b64=body.get("public_key", ""),
                                    message=message, signature_b64=body.get("signature", "")):
                return self.error(401, "bad_signature", "signature does not prove control of peer_id")
            node_id = next((n for n, r in self.nodes.items() if r["peer_id"] == body["peer_id"]),
                           f"node-{len(self.nodes) + 1}")
            token = secrets.token_urlsafe(16)
            self.tokens[token] = node_id
            now = time.time()
            record = self.nodes.setdefault(node_id, {"node_id": node_id, "registered_at": now,
                                                     "tokens_served": 0, "earned_far": "0"})
            record.update({k: body[k] for k in ("peer_id", "wallet_address", "model_id", "start_block", "end_block",
                                                "public_name", "hardware")})
            record.update(state="JOINING", last_seen=now, registrations=record.get("registrations", 0) + 1)
            return 200, {"node_id": node_id, "node_token": token, "heartbeat_interval_s": self.heartbeat_interval_s}
        if method == "POST" and path == "/nodes/heartbeat":
            record = self.node_for(auth)
            if record is None:
                return self.error(401, "unauthorized", "unknown node token")
            record["last_seen"] = time.time()
            record["heartbeats"] = record.get("heartbeats", 0) + 1
            if body.get("state"):
                record["state"] = body["state"]
            return 200, {"ok": True, "node_id": record["node_id"], "heartbeat_interval_s": self.heartbeat_interval_s,
                         "tokens_served": record["tokens_served"], "earned_far": record["earned_far"],
                         "state": record["state"]}
        if method == "POST" and path == "/nodes/unregister":
            record = self.node_for(auth)
            if record is None:
                return self.error(401, "unauthorized", "unknown node token")
            record["state"] = "OFFLINE"
            record["unregistered"] = True
            return 200, {"ok": True}
        if method == "GET" and path == "/models" and self.models is not None:
            return 200, {"models": [{"model_id": m, "num_blocks": n} for m, n in self.models.items()]}
        if method == "GET" and path == "/nodes/active":
            return 200, {"nodes": [r for r in self.nodes.values() if r["state"] != "OFFLINE"]}
        if method == "GET" and path.startswith("/nodes/"):
            record = self.nodes.get(path.rsplit("/", 1)[1])
            if record is None:
                return self.error(404, "not_found", "unknown node")
            return 200, {**record, "uptime_s": time.time() - record["registered_at"], "last_payout": None}
        return self.error(404, "not_found", path)


def fake_server_command(mode: str = "ok") -> str:
    return f"{sys.executable} {FAKE_SERVER} --mode {mode}"
