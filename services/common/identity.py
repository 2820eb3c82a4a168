"""A provider node's libp2p identity: the key file its Petals server uses, and proofs of peer-ID control.

A ``Qm…`` peer ID is the base58 sha2-256 multihash of the node's libp2p public key (protobuf ``PublicKey``
message with the RSA key as DER SubjectPublicKeyInfo). To register with discovery, a node signs the message
built by :func:`registration_message` (it contains a single-use nonce from ``GET /nodes/challenge``) with the
identity's RSA key (PSS, SHA-256: the scheme hivemind uses) and sends its public key; discovery checks with
:func:`verify_signature` that the key hashes to the claimed peer ID and that the signature is valid.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import base58
from cryptography import exceptions
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
_SHA2_256_MULTIHASH_PREFIX = bytes([0x12, 0x20])
REGISTRATION_DOMAIN = "far-mesh-register-v2"
# Node identities are RSA (hivemind and create_identity() make 2048-bit keys with e = 65537). Verifying costs grow
# with the key size and the exponent (a crafted huge key or exponent costs ~80x a normal verify), so only these
# are accepted.
RSA_MIN_BITS, RSA_MAX_BITS, RSA_EXPONENT = 2048, 4096, 65537


def _crypto_pb2():
    from hivemind.proto import crypto_pb2

    return crypto_pb2


def peer_id_from_public_key(public_key_protobuf: bytes) -> str:
    return base58.b58encode(_SHA2_256_MULTIHASH_PREFIX + hashlib.sha256(public_key_protobuf).digest()).decode()


@dataclass(frozen=True)
class NodeIdentity:
    path: Path
    peer_id: str
    public_key: bytes  # libp2p protobuf PublicKey
    _private_key: rsa.RSAPrivateKey

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_key).decode()

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self._private_key.sign(message, _PSS, hashes.SHA256())).decode()


def create_identity(path: str | Path) -> None:
    """Write a new RSA identity in hivemind's format (mode 0400) unless the file exists."""
    path = Path(path)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    crypto_pb2 = _crypto_pb2()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    data = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def load_identity(path: str | Path) -> NodeIdentity:
    crypto_pb2 = _crypto_pb2()
    path = Path(path)
    message = crypto_pb2.PrivateKey.FromString(path.read_bytes())
    if message.key_type != crypto_pb2.KeyType.RSA:
        raise ValueError(f"{path}: only RSA identities are supported")
    key = serialization.load_der_private_key(message.data, password=None)
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    public = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=spki).SerializeToString()
    return NodeIdentity(path, peer_id_from_public_key(public), public, key)


# What a node may say about its hardware (discovery refuses any other field): name -> kind.
HARDWARE_FIELDS = {"gpu": str, "vram_total_gb": float, "ram_total_gb": float, "device": str}


def canonical_hardware(hardware: dict | None) -> str:
    """The signed form of ``hardware``: JSON of the known fields that are not None, numbers as floats (the node may
    send 24, discovery parses 24.0), keys sorted, no spaces, ASCII."""
    hardware = hardware or {}
    unknown = sorted(set(hardware) - set(HARDWARE_FIELDS))
    if unknown:
        raise ValueError(f"hardware: unknown fields {unknown} (allowed: {', '.join(HARDWARE_FIELDS)})")
    values = {name: kind(hardware[name]) for name, kind in HARDWARE_FIELDS.items() if hardware.get(name) is not None}
    return json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def registration_message(*, nonce: str, peer_id: str, wallet_address: str, model_id: str, start_block: int,
                         end_block: int, public_name: str | None, hardware: dict | None) -> bytes:
    """What a node signs to register (docs/discovery.md "Registration"): one field per line, UTF-8::

        far-mesh-register-v2
        <nonce>
        <peer_id>
        <wallet_address, lowercase>
        <model_id>
        <start_block>
        <end_block>
        <public_name as JSON: "name" or null>
        <canonical_hardware(hardware)>

    Every field discovery stores and publishes is covered, so nothing can be changed on the way.
    """
    return "\n".join([REGISTRATION_DOMAIN, nonce, peer_id, wallet_address.lower(), model_id, str(start_block),
                      str(end_block), json.dumps(public_name, ensure_ascii=True),
                      canonical_hardware(hardware)]).encode()


def public_key_problem(public_key_b64: str) -> str | None:
    """Why ``public_key_b64`` is not an acceptable node identity key (None if it is): a libp2p protobuf RSA key of
    RSA_MIN_BITS..RSA_MAX_BITS bits with exponent RSA_EXPONENT. Cheap (parsing only, no signature check)."""
    crypto_pb2 = _crypto_pb2()
    try:
        parsed = crypto_pb2.PublicKey.FromString(base64.b64decode(public_key_b64, validate=True))
        if parsed.key_type != crypto_pb2.RSA:
            return "public_key is not an RSA key"
        key = serialization.load_der_public_key(parsed.data)
    except Exception:  # noqa: BLE001 - any parse failure is "not a key"
        return "public_key is not a base64 libp2p RSA public key"
    if not isinstance(key, rsa.RSAPublicKey):
        return "public_key is not an RSA key"
    if not RSA_MIN_BITS <= key.key_size <= RSA_MAX_BITS:
        return f"RSA key of {key.key_size} bits (accepted: {RSA_MIN_BITS}-{RSA_MAX_BITS})"
    if key.public_numbers().e != RSA_EXPONENT:
        return f"RSA public exponent must be {RSA_EXPONENT}"
    return None


def verify_signature(*, peer_id: str, public_key_b64: str, message: bytes, signature_b64: str) -> bool:
    """True iff the public key is acceptable (:func:`public_key_problem`), hashes to ``peer_id`` and ``signature`` is
    its signature of ``message``. CPU-bound (an RSA verify): async callers run it in a worker thread."""
    crypto_pb2 = _crypto_pb2()
    try:
        public = base64.b64decode(public_key_b64, validate=True)
        signature = base64.b64decode(signature_b64, validate=True)
        if peer_id_from_public_key(public) != peer_id:
            return False
        if public_key_problem(public_key_b64) is not None:
            return False
        key = serialization.load_der_public_key(crypto_pb2.PublicKey.FromString(public).data)
        key.verify(signature, message, _PSS, hashes.SHA256())
        return True
    except (binascii.Error, ValueError, TypeError, exceptions.InvalidSignature, Exception):
        return False
