"""Solidity: committed artifacts are reproducible from the sources with the pinned npm solc; FarPayout rules."""

from __future__ import annotations

import json
from pathlib import Path
import shutil
import subprocess

import pytest
from eth_tester.exceptions import TransactionFailed
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD

from services.common.config import PROJECT_ROOT
from services.payouts.chain import ARTIFACTS, deploy_contracts, new_local_chain

BUILD_DIR = Path(str(ARTIFACTS))  # a plain folder in a source checkout
from tests.payouts_support import wallet

CONTRACTS = PROJECT_ROOT / "contracts"
REVERTS = (ContractLogicError, TransactionFailed)


@pytest.fixture(scope="module")
def solc_ready():
    if shutil.which("node") is None:
        pytest.skip("node not installed")
    if not (CONTRACTS / "node_modules" / "solc").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=CONTRACTS, check=True,
                       timeout=300)


def test_artifacts_match_sources(solc_ready, tmp_path):
    subprocess.run(["node", "build.js", "--out", str(tmp_path)], cwd=CONTRACTS, check=True, capture_output=True,
                   timeout=300)
    built = sorted(p.name for p in tmp_path.glob("*.json"))
    assert built == sorted(p.name for p in BUILD_DIR.glob("*.json")) == ["FarDeposit.json", "FarPayout.json",
                                                                         "FarToken.json"]
    for name in built:
        fresh, committed = json.loads((tmp_path / name).read_text()), json.loads((BUILD_DIR / name).read_text())
        assert fresh["bytecode"] == committed["bytecode"], f"{name}: stale bytecode, run contracts/build.sh"
        assert fresh["deployedBytecode"] == committed["deployedBytecode"], name
        assert fresh["abi"] == committed["abi"], name
        assert (tmp_path / name).read_text() == (BUILD_DIR / name).read_text()


def test_pinned_compiler_and_evm_version():
    package = json.loads((CONTRACTS / "package.json").read_text())
    lock = json.loads((CONTRACTS / "package-lock.json").read_text())
    version = package["devDependencies"]["solc"]
    assert version[0].isdigit(), "solc must be pinned to an exact version"
    assert lock["packages"]["node_modules/solc"]["version"] == version
    for path in BUILD_DIR.glob("*.json"):
        artifact = json.loads(path.read_text())
        assert artifact["compiler"]["version"].startswith(version + "+")
        assert artifact["compiler"]["evmVersion"] == "cancun"
    for source in (CONTRACTS / "src").glob("*.sol"):
        assert f"pragma solidity {version};" in source.read_text()


@pytest.fixture(scope="module")
def chain():
    return new_local_chain()


def _tx(chain, fn, sender=None):
    return fn.build_transaction({"from": sender or chain.address})


def test_pay_batch_once_per_batch_id(chain):
    payout, token = chain.payout, chain.token
    recipients, amounts = [wallet(1), wallet(2)], [10**18, 5]
    receipt = chain.send(_tx(chain, payout.functions.payBatch(77, recipients, amounts)))
    assert [chain.far_balance(r) for r in recipients] == amounts
    assert payout.functions.paid(77).call() is True
    events = payout.events.BatchPaid().process_receipt(receipt, errors=DISCARD)
    assert [(e.args.batchId, e.args.recipientCount, e.args.total) for e in events] == [(77, 2, 10**18 + 5)]
    transfers = token.events.Transfer().process_receipt(receipt, errors=DISCARD)
    assert [(e.args.to, e.args.value) for e in transfers] == list(zip(recipients, amounts))
    with pytest.raises(REVERTS):
        chain.send(_tx(chain, payout.functions.payBatch(77, recipients, amounts)))
    assert [chain.far_balance(r) for r in recipients] == amounts


@pytest.mark.parametrize("args", [
    ([], []),                                  # empty
    ([wallet(3)], [1, 2]),                     # length mismatch
    ([wallet(3)], [0]),                        # zero amount
    (["0x" + "0" * 40], [1]),                  # zero address
])
def test_pay_batch_rejects_bad_input(chain, args):
    with pytest.raises(REVERTS):
        chain.w3.eth.estimate_gas(_tx(chain, chain.payout.functions.payBatch(1000, *args)))


def test_only_owner_can_pay(chain):
    stranger = chain.w3.eth.accounts[3]
    with pytest.raises(REVERTS):
        chain.w3.eth.estimate_gas({"from": stranger, "to": chain.payout.address,
                                   "data": chain.payout.encode_abi("payBatch", args=[1001, [wallet(4)], [1]])})


def test_pays_from_own_balance_without_treasury():
    chain = new_local_chain(deploy=False)
    deploy_contracts(chain)
    chain.send(_tx(chain, chain.payout.functions.setTreasury("0x" + "0" * 40)))
    chain.send(_tx(chain, chain.token.functions.transfer(chain.payout.address, 100)))
    chain.send(_tx(chain, chain.payout.functions.payBatch(1, [wallet(5)], [60])))
    assert chain.far_balance(wallet(5)) == 60 and chain.far_balance(chain.payout.address) == 40
    with pytest.raises(REVERTS):  # more than the contract holds
        chain.w3.eth.estimate_gas(_tx(chain, chain.payout.functions.payBatch(2, [wallet(5)], [41])))
