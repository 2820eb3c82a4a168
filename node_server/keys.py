"""The node's libp2p identity key file, read and created without importing hivemind (and so torch).

``far-node run`` is a small supervisor process: it must know its peer ID and sign the discovery challenge, but
it should not pay ~3 s and ~300 MB for ``import hivemind`` (which imports torch) just to decode a two-field
protobuf message. The file format is hivemind's (``crypto.pb.PrivateKey``, proto2: ``key_type`` = 1 varint,
``data`` = 2 bytes, RSA key as PKCS#1 DER); the Petals server child reads the same file, so the peer ID it
announces is the one we register. ``services.common.identity`` stays the reference implementation; a test
checks both agree.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.common.identity import NodeIdentity, peer_id_from_public_key

RSA_KEY_TYPE = 0


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def encode_key_message(key_type: int, data: bytes) -> bytes:
    """Serialize a ``crypto.pb.PublicKey``/``PrivateKey`` message (both have the same two fields)."""
    return b"\x08" + _varint(key_type) + b"\x12" + _varint(len(data)) + data


def decode_key_message(message: bytes) -> tuple[int, bytes]:
    key_type, data, pos = None, None, 0
    while pos < len(message):
        tag, pos = _read_varint(message, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _read_varint(message, pos)
            if field == 1:
                key_type = value
        elif wire == 2:
            length, pos = _read_varint(message, pos)
            value = message[pos:pos + length]
            if len(value) != length:
                raise ValueError("truncated field")
            pos += length
            if field == 2:
                data = bytes(value)
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    if key_type is None or data is None:
        raise ValueError("not a libp2p key message (key_type/data missing)")
    return key_type, data


def ensure_identity(path: str | Path) -> bool:
    """Create a new RSA identity (mode 0400) unless the file exists. Returns True if it was created."""
    path = Path(path)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as file:
        file.write(encode_key_message(RSA_KEY_TYPE, der))
    return True


def load_identity(path: str | Path) -> NodeIdentity:
    path = Path(path)
    key_type, der = decode_key_message(path.read_bytes())
    if key_type != RSA_KEY_TYPE:
        raise ValueError(f"{path}: only RSA identities are supported")
    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path}: not an RSA private key")
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    public = encode_key_message(RSA_KEY_TYPE, spki)
    return NodeIdentity(path, peer_id_from_public_key(public), public, key)
