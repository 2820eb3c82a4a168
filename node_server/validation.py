"""Pure validation of the provider's answers (wizard prompts and flags share these; no TTY, no network).

Each ``parse_*`` returns the normalized value or raises ``ValueError`` with a message fit to show a user as is.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Optional

from services.common.swarm import BlockSpan
from services.common.wallets import checksum_address
from services.common.wallets import wallet_problem as common_wallet_problem

AUTO = "auto"
DTYPES = ("float32", "float16", "bfloat16")
_HOSTNAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def wallet_problem(text: str) -> Optional[str]:
    """Why ``text`` is not a usable payout wallet (None if it is one: checksummed, or all one case)."""
    text = text.strip()
    if not text:
        return "a payout wallet address is required (0x followed by 40 hex digits)"
    problem = common_wallet_problem(text)
    return f"{text!r} {problem}" if problem else None


def parse_wallet(text: str) -> str:
    """A valid wallet address, returned in EIP-55 checksummed form."""
    problem = wallet_problem(text)
    if problem:
        raise ValueError(problem)
    return checksum_address(text.strip())



def parse_port(value: str | int) -> int:
    try:
        port = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range: use 1-65535 (31330 is the usual one)")
    return port


def parse_blocks(text: str, num_blocks: Optional[int] = None) -> str:
    """``auto`` or a ``START:END`` span (checked against the model's block count when it is known)."""
    text = str(text).strip().lower()
    if text in (AUTO, ""):
        return AUTO
    try:
        span = BlockSpan.parse(text, num_blocks)
    except ValueError as error:
        hint = f" (the model has blocks 0:{num_blocks})" if num_blocks else ""
        raise ValueError(f"{error}{hint}; or 'auto' to let Petals choose") from None
    return str(span)


def parse_num_blocks(value: str | int, num_blocks: Optional[int] = None) -> int:
    try:
        count = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a number of blocks") from None
    if count < 1:
        raise ValueError("serve at least one block")
    if num_blocks is not None and count > num_blocks:
        raise ValueError(f"the model has only {num_blocks} blocks")
    return count


def parse_address(text: str) -> str:
    """A public address to announce: an IP address or a DNS name."""
    text = text.strip()
    if not text:
        raise ValueError("an address is required")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if _HOSTNAME.fullmatch(text) and not text.replace(".", "").isdigit():
        return text
    raise ValueError(f"{text!r} is neither an IP address nor a host name")


def parse_device(text: str, available: Optional[list[str]] = None) -> str:
    text = text.strip().lower()
    if text == "gpu":
        text = "cuda"
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", text):
        raise ValueError(f"{text!r} is not a device: use cpu, cuda or cuda:N")
    if available is not None and text not in available and not (text == "cuda" and "cuda:0" in available):
        raise ValueError(f"device {text} is not available here (found: {', '.join(available)})")
    return text


def parse_dtype(text: str, device: str = "cpu") -> str:
    text = text.strip().lower().replace("torch.", "")
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    text = aliases.get(text, text)
    if text not in DTYPES:
        raise ValueError(f"{text!r} is not a dtype: use one of {', '.join(DTYPES)}")
    if device == "cpu" and text == "float16":
        raise ValueError("float16 is not supported on CPU: use float32 (or bfloat16)")
    return text


def parse_memory_limit(value: str | float | None, total_gb: Optional[float] = None) -> Optional[float]:
    """``auto`` (None) or a limit in GB (``20``, ``20GB``, ``20.5 GiB``), at most the device's memory."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in (AUTO, "", "none"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(g|gb|gib)?", text)
    if not match:
        raise ValueError(f"{value!r} is not a memory limit: give a number of GB (e.g. 20) or 'auto'")
    limit = float(match.group(1))
    if limit <= 0:
        raise ValueError("the memory limit must be positive")
    if total_gb is not None and limit > total_gb + 1e-9:
        raise ValueError(f"{limit:g} GB is more than this device has ({total_gb:.1f} GB)")
    return limit


def parse_initial_peers(text: str | list[str]) -> list[str]:
    peers = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if not peers:
        raise ValueError("at least one DHT bootstrap multiaddr is required (e.g. /ip4/1.2.3.4/tcp/31337/p2p/Qm...)")
    for peer in peers:
        if not peer.startswith("/") or "/p2p/" not in peer:
            raise ValueError(f"{peer!r} is not a bootstrap multiaddr of the form /ip4/HOST/tcp/PORT/p2p/PEER_ID")
    return peers


def model_num_blocks(model: str) -> Optional[int]:
    """The number of transformer blocks of a local model directory (None if unknown)."""
    config = Path(model).expanduser() / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(data.get(key), int):
            return data[key]
    return None


def parse_model_path(text: str) -> str:
    path = Path(text.strip()).expanduser()
    if not path.is_dir():
        raise ValueError(f"{text!r} is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"{text!r} has no config.json: not a model directory")
    return str(path.resolve())
