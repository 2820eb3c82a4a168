// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

interface IERC20Deposit {
    function transferFrom(address from, address to, uint256 value) external returns (bool);
}

/// @title Far Mesh prepaid deposits
/// @notice A user funds a Far Mesh account by calling `deposit(accountRef, amount)` after approving this contract
///         on the FAR token. The FAR moves straight from the caller to the platform `treasury` (nothing is held
///         here) and `Deposit(accountRef, from, amount)` names the account: the deposit watcher credits that
///         account once the event is PAYOUT_CONFIRMATIONS deep, exactly once per (transaction hash, log index).
///         `accountRef` is the account's UUID (16 bytes) right-aligned in a bytes32 (see docs/accounts.md).
///         One contract address to watch, no per-account keys, no sweeping: see docs/accounts.md for the choice.
contract FarDeposit {
    IERC20Deposit public immutable token;
    address public immutable treasury;

    event Deposit(bytes32 indexed accountRef, address indexed from, uint256 amount);

    error ZeroAddress();
    error ZeroAccount();
    error ZeroAmount();
    error TokenTransferFailed(address from, uint256 amount);

    constructor(address token_, address treasury_) {
        if (token_ == address(0) || treasury_ == address(0)) revert ZeroAddress();
        token = IERC20Deposit(token_);
        treasury = treasury_;
    }

    /// @notice Move `amount` token base units from the caller to the treasury, credited to `accountRef`.
    function deposit(bytes32 accountRef, uint256 amount) external {
        if (accountRef == bytes32(0)) revert ZeroAccount();
        if (amount == 0) revert ZeroAmount();
        // SafeERC20-style call: accepts tokens that return nothing and tokens that return true.
        (bool ok, bytes memory result) =
            address(token).call(abi.encodeCall(IERC20Deposit.transferFrom, (msg.sender, treasury, amount)));
        bool accepted = result.length == 0 ? address(token).code.length != 0 : abi.decode(result, (bool));
        if (!ok || !accepted) revert TokenTransferFailed(msg.sender, amount);
        emit Deposit(accountRef, msg.sender, amount);
    }
}
