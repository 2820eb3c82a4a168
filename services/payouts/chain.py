"""Web3 connection, payer key and contract handles for the payment tracker.

Networks (docs/payouts.md "Networks and keys"):

* ``local`` — with ``BSC_RPC_URL`` set, any local JSON-RPC node (anvil from npm, see ``far-mesh chain devnode``);
  without it, an in-process py-evm chain through web3's ``EthereumTesterProvider`` (one per process, contracts
  deployed on first use: the embedded default for the demo and for tests).
* ``testnet`` — BSC testnet, chain id 97, via ``BSC_RPC_URL``.
* ``mainnet`` — BSC mainnet, chain id 56, via ``BSC_RPC_URL``; the payer key must come from an encrypted keystore
  (``PAYOUT_KEYSTORE`` + ``PAYOUT_KEYSTORE_PASSWORD_FILE``); a plaintext ``PAYOUT_PRIVATE_KEY`` is refused.

BSC blocks carry more extraData than the yellow paper allows, so ``ExtraDataToPOAMiddleware`` is injected for
testnet and mainnet.
"""

from __future__ import annotations

import importlib.resources
import json
import stat
import threading
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.middleware import ExtraDataToPOAMiddleware

from services.common.config import PayoutSettings, confirmations_problem
from services.common.logs import get_logger
from services.common.redact import redact_url, scrub_url  # noqa: F401 - re-exported (payouts server, CLI)
from services.common.money import to_base_units

log = get_logger(__name__)

# Compiled by contracts/build.sh; package data, so an installed far-mesh has them too.
ARTIFACTS = importlib.resources.files("services.payouts") / "artifacts"
CHAIN_IDS = {"testnet": 97, "mainnet": 56}
NETWORKS = ("local", "testnet", "mainnet")

# The first account of anvil's well-known development mnemonic. Only ever used on network "local".
LOCAL_DEV_PRIVATE_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
LOCAL_INITIAL_SUPPLY_FAR = Decimal("1000000000")


class ChainConfigError(RuntimeError):
    """A configuration problem detected while connecting (bad network, key, chain id, addresses)."""


def load_artifact(name: str) -> dict[str, Any]:
    path = ARTIFACTS / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ChainConfigError(f"missing contract artifact {path} (run contracts/build.sh)") from None


@dataclass
class Chain:
    w3: Web3
    network: str
    account: LocalAccount
    token: Any = None  # web3 Contract
    payout: Any = None  # web3 Contract
    deposit: Any = None  # web3 Contract (FarDeposit), when configured
    in_process: bool = False
    deploy_block: int = 0
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def address(self) -> str:
        return self.account.address

    @property
    def chain_id(self) -> int:
        return self.w3.eth.chain_id

    @property
    def is_local(self) -> bool:
        return self.network == "local"

    def advance(self, blocks: int = 1) -> None:
        """Mine empty blocks on a local chain (confirmations on a chain that only mines on demand)."""
        if not self.is_local or blocks <= 0:
            return
        if self.in_process:
            self.w3.provider.ethereum_tester.mine_blocks(blocks)
        else:
            for _ in range(blocks):
                self.w3.provider.make_request("evm_mine", [])

    def gas_price(self) -> int:
        """Legacy (type 0) gas price: what BSC validators expect; on a local chain at least its base fee."""
        price = self.w3.eth.gas_price
        if self.is_local:
            base_fee = self.w3.eth.get_block("latest").get("baseFeePerGas") or 0
            price = max(price, 2 * base_fee)
        return int(price)

    def send(self, tx: dict[str, Any], *, gas_cap: int | None = None) -> Any:
        """Sign and send a transaction from the payer account and wait for its receipt (deploy/admin helper)."""
        with self._lock:
            tx = {key: tx[key] for key in ("to", "data", "value", "gas") if key in tx}
            tx.update({"from": self.address, "chainId": self.chain_id, "gasPrice": self.gas_price(),
                       "nonce": self.w3.eth.get_transaction_count(self.address, "pending")})
            if "gas" not in tx:
                estimate = self.w3.eth.estimate_gas(tx)
                tx["gas"] = min(int(estimate * 1.2) + 10_000, gas_cap or 30_000_000)
            signed = self.account.sign_transaction(tx)
            tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
            receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=180)
            if receipt["status"] != 1:
                raise RuntimeError(f"transaction {tx_hash.hex()} reverted")
            return receipt

    def deploy(self, name: str, *args: Any) -> Any:
        artifact = load_artifact(name)
        factory = self.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        receipt = self.send(factory.constructor(*args).build_transaction({"from": self.address}))
        return self.w3.eth.contract(address=receipt["contractAddress"], abi=artifact["abi"])

    def attach(self, token_address: str | None, payout_address: str | None) -> None:
        if token_address:
            self.token = self.w3.eth.contract(address=Web3.to_checksum_address(token_address),
                                              abi=load_artifact("FarToken")["abi"])
        if payout_address:
            self.payout = self.w3.eth.contract(address=Web3.to_checksum_address(payout_address),
                                               abi=load_artifact("FarPayout")["abi"])

    def attach_deposit(self, deposit_address: str | None) -> None:
        if deposit_address:
            self.deposit = self.w3.eth.contract(address=Web3.to_checksum_address(deposit_address),
                                                abi=load_artifact("FarDeposit")["abi"])

    def far_balance(self, wallet: str) -> int:
        return self.token.functions.balanceOf(Web3.to_checksum_address(wallet)).call()


def deploy_contracts(chain: Chain, *, treasury: str | None = None,
                     initial_supply_far: Decimal = LOCAL_INITIAL_SUPPLY_FAR,
                     token_address: str | None = None) -> dict[str, str]:
    """Deploy FarToken (unless ``token_address`` is given) and FarPayout; approve the payout contract.

    The treasury (default: the payer account) holds the supply and grants FarPayout an unlimited allowance, so
    payBatch pays with ``transferFrom(treasury, ...)``.
    """
    treasury = Web3.to_checksum_address(treasury or chain.address)
    if token_address:
        chain.attach(token_address, None)
    else:
        chain.token = chain.deploy("FarToken", treasury, to_base_units(initial_supply_far))
    chain.payout = chain.deploy("FarPayout", chain.token.address, treasury)
    chain.deploy_block = chain.w3.eth.block_number
    chain.deposit = chain.deploy("FarDeposit", chain.token.address, treasury)
    if treasury == chain.address:
        chain.send(chain.token.functions.approve(chain.payout.address, 2**256 - 1).build_transaction(
            {"from": chain.address}))
    log.info("payouts.contracts_deployed", network=chain.network, token=chain.token.address,
             payout=chain.payout.address, treasury=treasury)
    return {"FAR_TOKEN_ADDRESS": chain.token.address, "PAYOUT_CONTRACT_ADDRESS": chain.payout.address,
            "DEPOSIT_CONTRACT_ADDRESS": chain.deposit.address, "treasury": treasury,
            "block": str(chain.deploy_block)}


# ---------------------------------------------------------------------------------------------- keys


def load_account(settings: PayoutSettings, network: str) -> LocalAccount:
    """The payer key: keystore (+ password file) first; a plaintext key only off mainnet; a dev key on local."""
    if settings.PAYOUT_KEYSTORE:
        keystore = Path(settings.PAYOUT_KEYSTORE)
        if not settings.PAYOUT_KEYSTORE_PASSWORD_FILE:
            raise ChainConfigError("PAYOUT_KEYSTORE_PASSWORD_FILE: required with PAYOUT_KEYSTORE")
        password_file = Path(settings.PAYOUT_KEYSTORE_PASSWORD_FILE)
        try:
            encrypted = json.loads(keystore.read_text())
        except (OSError, ValueError) as error:
            raise ChainConfigError(f"PAYOUT_KEYSTORE: cannot read keystore {keystore}: {error}") from None
        try:
            mode = password_file.stat().st_mode
            password = password_file.read_text().rstrip("\r\n")
        except OSError as error:
            raise ChainConfigError(f"PAYOUT_KEYSTORE_PASSWORD_FILE: cannot read {password_file}: {error}") from None
        if network == "mainnet" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ChainConfigError(f"PAYOUT_KEYSTORE_PASSWORD_FILE: {password_file} is readable by group/others "
                                   "(chmod 600 it)")
        try:
            key = Account.decrypt(encrypted, password)
        except ValueError:
            raise ChainConfigError("PAYOUT_KEYSTORE: wrong password or corrupt keystore") from None
        return Account.from_key(key)
    if settings.PAYOUT_PRIVATE_KEY:
        if network == "mainnet":
            raise ChainConfigError("PAYOUT_PRIVATE_KEY: refused on mainnet; use PAYOUT_KEYSTORE + "
                                   "PAYOUT_KEYSTORE_PASSWORD_FILE")
        try:
            return Account.from_key(settings.PAYOUT_PRIVATE_KEY)
        except Exception:  # noqa: BLE001 - never echo the key
            raise ChainConfigError("PAYOUT_PRIVATE_KEY: not a valid secp256k1 private key") from None
    if network == "local":
        return Account.from_key(LOCAL_DEV_PRIVATE_KEY)
    raise ChainConfigError(f"PAYOUT_KEYSTORE: required for network {network} (payer key)")


# ------------------------------------------------------------------------------------------ connect

_in_process: dict[str, Chain] = {}
_in_process_lock = threading.Lock()


def local_contracts_file(settings: PayoutSettings) -> Path:
    """Where ``far-mesh chain deploy --network local`` records the addresses it deployed."""
    return Path(settings.FAR_MESH_STATE_DIR) / "contracts-local.json"


def new_local_chain(account: LocalAccount | None = None, *, deploy: bool = True) -> Chain:
    """A new in-process py-evm chain (web3 EthereumTesterProvider), payer funded, contracts deployed."""
    from eth_tester import EthereumTester, PyEVMBackend
    from web3 import EthereumTesterProvider

    account = account or Account.from_key(LOCAL_DEV_PRIVATE_KEY)
    tester = EthereumTester(PyEVMBackend())
    w3 = Web3(EthereumTesterProvider(tester))
    # Fund the payer from the tester's pre-funded account.
    w3.eth.send_transaction({"from": w3.eth.accounts[0], "to": account.address, "value": 10**23})
    chain = Chain(w3=w3, network="local", account=account, in_process=True)
    if deploy:
        deploy_contracts(chain)
    return chain


def _in_process_chain(settings: PayoutSettings, account: LocalAccount) -> Chain:
    with _in_process_lock:
        chain = _in_process.get(account.address)
        if chain is None:
            chain = _in_process[account.address] = new_local_chain(account)
        return chain


def connect(settings: PayoutSettings, network: str | None = None, *, rpc_url: str | None = None,
            token_address: str | None = None, payout_address: str | None = None,
            require_contracts: bool = True) -> Chain:
    network = network or settings.BSC_NETWORK
    if network not in NETWORKS:
        raise ChainConfigError(f"BSC_NETWORK: unknown network {network!r} (local, testnet or mainnet)")
    too_few = confirmations_problem(network, settings.PAYOUT_CONFIRMATIONS)  # --network may differ from BSC_NETWORK
    if too_few:
        raise ChainConfigError(too_few)
    account = load_account(settings, network)
    rpc_url = rpc_url if rpc_url is not None else settings.BSC_RPC_URL
    token_address = token_address or settings.FAR_TOKEN_ADDRESS
    payout_address = payout_address or settings.PAYOUT_CONTRACT_ADDRESS

    if network == "local" and not rpc_url:
        chain = _in_process_chain(settings, account)
        if token_address or payout_address:
            chain.attach(token_address, payout_address)
        chain.attach_deposit(settings.DEPOSIT_CONTRACT_ADDRESS)
        return chain

    if not rpc_url:
        raise ChainConfigError(f"BSC_RPC_URL: required for network {network}")
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 30}))
    if network in CHAIN_IDS:
        w3.middleware_onion.inject(ExtraDataToPOAMiddleware, layer=0)
    try:
        chain_id = w3.eth.chain_id
    except Exception as error:  # noqa: BLE001
        raise ChainConfigError(f"BSC_RPC_URL: cannot reach {redact_url(rpc_url)}: "
                               f"{scrub_url(str(error), rpc_url)}") from None
    expected = CHAIN_IDS.get(network)
    if expected is not None and chain_id != expected:
        raise ChainConfigError(f"BSC_RPC_URL: {redact_url(rpc_url)} is chain {chain_id}, network {network} "
                               f"needs {expected}")
    if network == "local" and chain_id in CHAIN_IDS.values():
        raise ChainConfigError(f"BSC_RPC_URL: {redact_url(rpc_url)} is BSC chain {chain_id}; use --network "
                               f"{'mainnet' if chain_id == 56 else 'testnet'}")
    chain = Chain(w3=w3, network=network, account=account)
    if network == "local" and not (token_address and payout_address):
        recorded = local_contracts_file(settings)
        if recorded.exists():
            data = json.loads(recorded.read_text())
            if data.get("rpc_url") == rpc_url and data.get("chain_id") == chain_id:
                token_address = token_address or data["FAR_TOKEN_ADDRESS"]
                payout_address = payout_address or data["PAYOUT_CONTRACT_ADDRESS"]
                chain.deploy_block = int(data.get("block", 0))
                if not settings.DEPOSIT_CONTRACT_ADDRESS and data.get("DEPOSIT_CONTRACT_ADDRESS"):
                    chain.attach_deposit(data["DEPOSIT_CONTRACT_ADDRESS"])
    if require_contracts and not (token_address and payout_address):
        missing = "FAR_TOKEN_ADDRESS" if not token_address else "PAYOUT_CONTRACT_ADDRESS"
        raise ChainConfigError(f"{missing}: required for network {network} (deploy with `far-mesh chain deploy`)")
    chain.attach(token_address, payout_address)
    chain.attach_deposit(settings.DEPOSIT_CONTRACT_ADDRESS)
    return chain


def record_local_deployment(settings: PayoutSettings, chain: Chain, rpc_url: str, addresses: dict[str, str]) -> Path:
    path = local_contracts_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**addresses, "rpc_url": rpc_url, "chain_id": chain.chain_id}, indent=2) + "\n")
    return path
