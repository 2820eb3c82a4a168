"""``far-node start``: the setup wizard (questionary prompts), or the same answers from flags (``--yes``).

Every question has a flag. A flag's value is validated and never asked again (invalid: exit 2 naming the
flag). Without ``--yes`` the remaining questions are asked on the terminal; an invalid answer shows why and
the question stays open. With ``--yes`` the remaining questions take their defaults (the wallet has none, so
``--wallet`` is required). Both paths build the same :class:`NodeConfig`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import typer

from node_server import hardware, validation
from node_server.config import DEFAULT_PORT, NodeConfig, default_config_path, default_state_dir, save_config

LOCAL_PATH_CHOICE = "Local path…"
OTHER_ADDRESS_CHOICE = "Other (type an address or DNS name)…"
AUTO_BLOCKS_CHOICE = "auto: let Petals choose the least covered blocks"
RANGE_BLOCKS_CHOICE = "a range START:END"


class UsageError(Exception):
    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag, self.message = flag, message


@dataclass
class WizardInputs:
    """The flags of ``far-node start`` (None: not given)."""

    config_path: Optional[Path] = None
    yes: bool = False
    wallet: Optional[str] = None
    model: Optional[str] = None
    model_id: Optional[str] = None
    blocks: Optional[str] = None
    num_blocks: Optional[int] = None
    public_address: Optional[str] = None
    port: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    memory_limit: Optional[str] = None
    initial_peers: Optional[str] = None
    discovery_url: Optional[str] = None
    identity: Optional[Path] = None
    public_name: Optional[str] = None


def _validator(parse: Callable[[str], object]) -> Callable[[str], object]:
    """questionary validate callback: True, or the message to show under the prompt."""

    def validate(text: str):
        try:
            parse(text)
            return True
        except ValueError as error:
            return str(error)

    return validate


class Wizard:
    def __init__(self, inputs: WizardInputs, *, console=None):
        from rich.console import Console

        from services.common.config import NodeSettings, get_settings

        self.inputs = inputs
        self.settings = get_settings(NodeSettings)
        self.console = console or Console(highlight=False)
        self.interactive = not inputs.yes
        self._discovery = None

    # -- helpers ----------------------------------------------------------------------------------------
    def _check_flag(self, flag: str, value, parse: Callable):
        try:
            return parse(value)
        except ValueError as error:
            raise UsageError(flag, str(error)) from None

    def _need_terminal(self, flag: str) -> None:
        if not sys.stdin.isatty():
            raise UsageError(flag, "not given and stdin is not a terminal: pass it as a flag (with --yes to accept "
                                   "defaults for the rest)")

    @staticmethod
    def _ask(question):
        answer = question.ask()
        if answer is None:  # Ctrl-C / Ctrl-D
            raise typer.Abort()
        return answer

    def discovery(self):
        if self._discovery is None:
            from node_server.discovery_client import DiscoveryClient

            self._discovery = DiscoveryClient(self.discovery_url, timeout=2.0)
        return self._discovery

    # -- questions ----------------------------------------------------------------------------------------
    def ask_wallet(self) -> str:
        import questionary

        if self.inputs.wallet is not None:
            return self._check_flag("--wallet", self.inputs.wallet, validation.parse_wallet)
        if not self.interactive:
            raise UsageError("--wallet", "a payout wallet address is required (no default) with --yes")
        self._need_terminal("--wallet")
        typed = self._ask(questionary.text(
            "Payout wallet address (BNB Smart Chain, receives your weekly FAR payouts):",
            validate=_validator(validation.parse_wallet))).strip()
        checksummed = validation.checksum_address(typed)
        if typed != checksummed:
            use = self._ask(questionary.confirm(f"Use its EIP-55 checksummed form {checksummed}?", default=True))
            if not use:
                return typed
        return checksummed

    def known_models(self) -> list[str]:
        from node_server.discovery_client import DiscoveryError

        models = []
        try:
            models = self.discovery().known_models()
        except DiscoveryError as error:
            self.console.print(f"[dim](discovery at {self.discovery_url} not reachable: {error}; "
                               f"offering the default model)[/dim]")
        if self.settings.DEFAULT_MODEL_ID not in models:
            models.insert(0, self.settings.DEFAULT_MODEL_ID)
        return models

    def _weights_for(self, model_id: str) -> str:
        """Where a chosen model's weights come from: the local copy of the default model, else the hub name."""
        if model_id == self.settings.DEFAULT_MODEL_ID and self.settings.FAR_MESH_MODEL_PATH:
            return str(Path(self.settings.FAR_MESH_MODEL_PATH).expanduser().resolve())
        return model_id

    def ask_model(self) -> tuple[str, str]:
        import questionary

        inputs = self.inputs
        if inputs.model is not None:
            model = inputs.model.strip()
            if Path(model).expanduser().exists():
                model = self._check_flag("--model", model, validation.parse_model_path)
            elif "/" not in model or model.startswith((".", "/", "~")):
                raise UsageError("--model", f"{model!r} is neither a model directory nor a hub name (owner/name)")
            model_id = inputs.model_id or (self.settings.DEFAULT_MODEL_ID if Path(model).is_dir() else model)
            return model, model_id.strip()
        if not self.interactive:
            model_id = inputs.model_id or self.settings.DEFAULT_MODEL_ID
            return self._weights_for(model_id), model_id
        self._need_terminal("--model")
        choice = self._ask(questionary.select("Which model will you serve?",
                                              choices=[*self.known_models(), LOCAL_PATH_CHOICE]))
        if choice != LOCAL_PATH_CHOICE:
            return self._weights_for(choice), inputs.model_id or choice
        path = self._ask(questionary.path("Model directory (with config.json):", only_directories=True,
                                          validate=_validator(validation.parse_model_path)))
        model = validation.parse_model_path(path)
        model_id = inputs.model_id or self._ask(questionary.text(
            "Model id announced in the swarm:", default=self.settings.DEFAULT_MODEL_ID,
            validate=lambda text: True if text.strip() else "a model id is required")).strip()
        return model, model_id

    def model_blocks(self, model: str, model_id: str) -> Optional[int]:
        count = validation.model_num_blocks(model)
        if count is None and self.discovery_url:
            count = self.discovery().expected_blocks(model_id)
        return count

    def ask_blocks(self, num_blocks: Optional[int]) -> str:
        import questionary

        parse = lambda text: validation.parse_blocks(text, num_blocks)  # noqa: E731
        if self.inputs.blocks is not None:
            return self._check_flag("--blocks", self.inputs.blocks, parse)
        if not self.interactive:
            return validation.AUTO
        self._need_terminal("--blocks")
        choice = self._ask(questionary.select("Which blocks will you serve?",
                                              choices=[AUTO_BLOCKS_CHOICE, RANGE_BLOCKS_CHOICE]))
        if choice == AUTO_BLOCKS_CHOICE:
            return validation.AUTO
        hint = f" (the model has blocks 0:{num_blocks})" if num_blocks else ""
        return parse(self._ask(questionary.text(f"Block range START:END{hint}:", validate=_validator(parse))))

    def ask_public_address(self) -> str:
        import questionary

        if self.inputs.public_address is not None:
            return self._check_flag("--public-address", self.inputs.public_address, validation.parse_address)
        addresses = hardware.local_addresses()
        default = addresses[0].address if addresses else "127.0.0.1"
        if not self.interactive:
            return default
        self._need_terminal("--public-address")
        choices = [questionary.Choice(a.label(), value=a.address) for a in addresses]
        choices.append(questionary.Choice(OTHER_ADDRESS_CHOICE, value=OTHER_ADDRESS_CHOICE))
        self.console.print("[dim]Addresses found on this machine's interfaces (no external service asked). Behind "
                           "NAT, pick Other and type your public IP or DNS name, and forward the port.[/dim]")
        choice = self._ask(questionary.select("Public address other peers will reach this node at:",
                                              choices=choices, use_search_filter=True, use_jk_keys=False))
        if choice != OTHER_ADDRESS_CHOICE:
            return choice
        return validation.parse_address(self._ask(questionary.text(
            "Public address:", validate=_validator(validation.parse_address))))

    def ask_port(self) -> int:
        import questionary

        if self.inputs.port is not None:
            return self._check_flag("--port", self.inputs.port, validation.parse_port)
        if not self.interactive:
            return DEFAULT_PORT
        self._need_terminal("--port")
        return validation.parse_port(self._ask(questionary.text(
            "TCP port (open it in your firewall):", default=str(DEFAULT_PORT),
            validate=_validator(validation.parse_port))))

    def ask_device(self, gpus: list) -> str:
        import questionary

        available = [g.device for g in gpus] + ["cpu"]
        parse = lambda text: validation.parse_device(text, available)  # noqa: E731
        if self.inputs.device is not None:
            device = self._check_flag("--device", self.inputs.device, parse)
            return "cuda:0" if device == "cuda" else device
        if not self.interactive:
            return available[0]
        self._need_terminal("--device")
        choices = [questionary.Choice(f"{g.device}: {g.name}, {g.vram_total_gb:.1f} GB VRAM", value=g.device)
                   for g in gpus]
        choices.append(questionary.Choice(f"cpu: {hardware.cpu_label()}", value="cpu"))
        if not gpus:
            self.console.print("[dim]No CUDA GPU found (NVML/torch); the node will serve on CPU.[/dim]")
        return self._ask(questionary.select("Device:", choices=choices))

    def ask_dtype(self, device: str, gpu_name: Optional[str], capability: Optional[tuple[int, int]] = None) -> str:
        import questionary

        parse = lambda text: validation.parse_dtype(text, device)  # noqa: E731
        if self.inputs.dtype is not None:
            return self._check_flag("--dtype", self.inputs.dtype, parse)
        default = hardware.default_dtype(device, gpu_name, capability)
        if not self.interactive:
            return default
        self._need_terminal("--dtype")
        options = ["float32", "bfloat16"] if device == "cpu" else ["float16", "bfloat16", "float32"]
        options.sort(key=lambda d: d != default)
        return self._ask(questionary.select("Weights dtype:", choices=options, default=default))

    def ask_memory_limit(self, total_gb: float, what: str) -> Optional[float]:
        import questionary

        parse = lambda text: validation.parse_memory_limit(text, total_gb)  # noqa: E731
        if self.inputs.memory_limit is not None:
            return self._check_flag("--memory-limit", self.inputs.memory_limit, parse)
        if not self.interactive:
            return None
        self._need_terminal("--memory-limit")
        return parse(self._ask(questionary.text(
            f"Memory limit in GB ({what}: {total_gb:.1f} GB; 'auto' = Petals decides):", default="auto",
            validate=_validator(parse))))

    def ask_initial_peers(self) -> list[str]:
        import questionary

        if self.inputs.initial_peers is not None:
            return self._check_flag("--initial-peers", self.inputs.initial_peers, validation.parse_initial_peers)
        default = self.settings.FAR_MESH_DHT_BOOTSTRAP
        if not self.interactive:
            return self._check_flag("--initial-peers", default, validation.parse_initial_peers)
        self._need_terminal("--initial-peers")
        return validation.parse_initial_peers(self._ask(questionary.text(
            "DHT bootstrap peers (comma-separated multiaddrs):", default=default,
            validate=_validator(validation.parse_initial_peers))))

    # -- the whole wizard ---------------------------------------------------------------------------------------
    @property
    def discovery_url(self) -> str:
        url = self.inputs.discovery_url
        return (url if url is not None else self.settings.DISCOVERY_URL).strip()

    def build(self) -> NodeConfig:
        if self.interactive:
            self.console.print("[bold]Far Mesh provider setup[/bold]: a few questions, then `far-node run`.\n")
        wallet = self.ask_wallet()
        model, model_id = self.ask_model()
        num_blocks = self.model_blocks(model, model_id)
        blocks = self.ask_blocks(num_blocks)
        count = None
        if self.inputs.num_blocks is not None:
            count = self._check_flag("--num-blocks", self.inputs.num_blocks,
                                     lambda v: validation.parse_num_blocks(v, num_blocks))
        public_address = self.ask_public_address()
        port = self.ask_port()
        gpus = hardware.detect_gpus()
        device = self.ask_device(gpus)
        gpu = next((g for g in gpus if g.device == device), None)
        dtype = self.ask_dtype(device, gpu.name if gpu else None, gpu.compute_capability if gpu else None)
        total = gpu.vram_total_gb if gpu else hardware.ram_total_gb()
        memory_limit = self.ask_memory_limit(total, "VRAM" if gpu else "RAM")
        initial_peers = self.ask_initial_peers()
        identity = (self.inputs.identity or default_state_dir() / "identity.key").expanduser().resolve()
        loopback = public_address in ("127.0.0.1", "::1", "localhost")
        return NodeConfig(
            wallet_address=wallet, model=model, model_id=model_id, blocks=blocks, num_blocks=count,
            public_address=public_address, host="127.0.0.1" if loopback else "0.0.0.0", port=port, device=device,
            dtype=dtype, memory_limit_gb=memory_limit, initial_peers=initial_peers,
            discovery_url=self.discovery_url, identity_path=str(identity), public_name=self.inputs.public_name)

    def summary(self, config: NodeConfig, path: Path) -> None:
        from rich.table import Table

        table = Table(title="Provider node configuration", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        memory = f"{config.memory_limit_gb:g} GB" if config.memory_limit_gb else "auto"
        rows = [
            ("payout wallet", config.wallet_address), ("model", f"{config.model_id}  ({config.model})"),
            ("blocks", config.blocks + (f" ({config.num_blocks} blocks)" if config.num_blocks else "")),
            ("public address", f"{config.public_address}:{config.port} (listening on {config.host})"),
            ("device / dtype", f"{config.device} / {config.dtype}"), ("memory limit", memory),
            ("DHT bootstrap", ", ".join(config.initial_peers)), ("discovery", config.discovery_url or "(none)"),
            ("identity key", config.identity_path), ("config file", str(path)),
        ]
        for name, value in rows:
            table.add_row(name, str(value))
        self.console.print(table)

    def run(self) -> Path:
        from node_server import keys

        path = (self.inputs.config_path or default_config_path()).expanduser()
        config = self.build()
        self.summary(config, path)
        if self.interactive:
            import questionary

            if not self._ask(questionary.confirm(f"Write this configuration to {path}?", default=True)):
                self.console.print("Nothing written.")
                raise typer.Exit(1)
        save_config(config, path)
        created = keys.ensure_identity(config.identity_path)
        peer_id = keys.load_identity(config.identity_path).peer_id
        self.console.print(f"Configuration written to {path} (mode 600).")
        self.console.print(f"Node identity {'created' if created else 'reused'}: peer ID {peer_id}")
        run_hint = "far-node run" + (f" --config {path}" if self.inputs.config_path else "")
        self.console.print(f"Next: [bold]{run_hint}[/bold]")
        return path
