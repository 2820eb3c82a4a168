"""The provider node's config file: TOML at ``$XDG_CONFIG_HOME/far-mesh/node.toml`` (or ``--config PATH``),
written by ``far-node start`` with mode 600 and read by ``far-node run`` (flags override it)."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

CONFIG_FILE_NAME = "node.toml"
DEFAULT_PORT = 31330


def default_config_path() -> Path:
    """``$XDG_CONFIG_HOME/far-mesh/node.toml`` (``~/.config/far-mesh/node.toml`` when unset)."""
    from platformdirs import user_config_path

    return user_config_path("far-mesh", appauthor=False) / CONFIG_FILE_NAME


def default_state_dir() -> Path:
    """Where the node keeps its identity key, registration and run status: ``$FAR_MESH_STATE_DIR/node`` when that
    is set (the local mesh and the tests give each node its own), else the user's state dir
    (``$XDG_STATE_HOME/far-mesh/node``, ``~/.local/state/far-mesh/node``) — never inside a source checkout or an
    installed package. A node set up by an older version under ``<checkout>/.far-mesh/node`` keeps that folder,
    so its identity (peer ID) and registration survive the upgrade."""
    if os.environ.get("FAR_MESH_STATE_DIR"):
        return Path(os.environ["FAR_MESH_STATE_DIR"]).expanduser().resolve() / "node"
    from platformdirs import user_state_path

    from services.common.config import PROJECT_ROOT

    legacy = PROJECT_ROOT / ".far-mesh" / "node"
    if (legacy / "identity.key").exists():
        return legacy
    return user_state_path("far-mesh", appauthor=False) / "node"


@dataclass
class NodeConfig:
    wallet_address: Optional[str] = None
    model: Optional[str] = None  # local directory, or a hub name
    model_id: Optional[str] = None  # the name the swarm and discovery know the model by
    blocks: str = "auto"  # "auto" (Petals picks the least covered blocks) or "START:END"
    num_blocks: Optional[int] = None  # with blocks = auto: how many (None: fit the memory limit)
    public_address: Optional[str] = None  # announced to the swarm
    host: str = "0.0.0.0"  # listen address
    port: int = DEFAULT_PORT
    device: str = "cpu"
    dtype: str = "float32"
    memory_limit_gb: Optional[float] = None  # None: auto
    initial_peers: list[str] = field(default_factory=list)
    discovery_url: Optional[str] = None
    identity_path: Optional[str] = None
    public_name: Optional[str] = None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> "NodeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {', '.join(unknown)}")
        return cls(**data)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps(config: NodeConfig) -> str:
    lines = ["# Far Mesh provider node, written by `far-node start`; `far-node run` flags override these values."]
    lines += [f"{key} = {_toml_value(value)}" for key, value in config.to_dict().items()]
    return "\n".join(lines) + "\n"


def save_config(config: NodeConfig, path: Path) -> Path:
    """Write atomically with mode 600 (the file names the payout wallet and the identity key)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(dumps(config))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_config(path: Path) -> NodeConfig:
    path = Path(path).expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML: {error}") from None
    return NodeConfig.from_dict(data, source=str(path))
