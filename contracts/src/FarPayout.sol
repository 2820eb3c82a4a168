// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

interface IERC20Minimal {
    function transfer(address to, uint256 value) external returns (bool);
    function transferFrom(address from, address to, uint256 value) external returns (bool);
}

/// @title Far Mesh weekly payout batches
/// @notice The payment tracker pays providers in batches: one `payBatch` transaction per batch, identified by
///         the tracker's `batchId` (far_payment_batches.batch_number). A batchId can be paid only once, so a
///         re-broadcast or a second tracker can never pay the same batch twice.
///         Tokens come from `treasury` through an ERC-20 allowance (`transferFrom`) when a treasury is set, or
///         from this contract's own balance when `treasury` is the zero address.
///         Each payment is visible on chain as the token's `Transfer` event in the batch transaction (no extra
///         per-recipient event: it would cost ~1.8k gas per recipient); `BatchPaid` closes the batch.
contract FarPayout {
    IERC20Minimal public immutable token;
    address public owner;
    address public treasury;

    /// batchId => paid
    mapping(uint256 => bool) public paid;

    event BatchPaid(uint256 indexed batchId, uint256 recipientCount, uint256 total);
    event TreasuryChanged(address indexed previousTreasury, address indexed newTreasury);
    event OwnershipTransferred(address indexed previousOwner, address indexed newOwner);

    error NotOwner();
    error ZeroAddress();
    error BatchAlreadyPaid(uint256 batchId);
    error EmptyBatch();
    error LengthMismatch(uint256 recipients, uint256 amounts);
    error ZeroAmount(uint256 index);
    error TokenTransferFailed(address recipient, uint256 amount);

    constructor(address token_, address treasury_) {
        if (token_ == address(0)) revert ZeroAddress();
        token = IERC20Minimal(token_);
        owner = msg.sender;
        treasury = treasury_;
        emit OwnershipTransferred(address(0), msg.sender);
        emit TreasuryChanged(address(0), treasury_);
    }

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner();
        _;
    }

    /// @notice Pay `amounts[i]` token base units to `recipients[i]`, once per `batchId`.
    function payBatch(uint256 batchId, address[] calldata recipients, uint256[] calldata amounts)
        external
        onlyOwner
    {
        uint256 count = recipients.length;
        if (count == 0) revert EmptyBatch();
        if (count != amounts.length) revert LengthMismatch(count, amounts.length);
        if (paid[batchId]) revert BatchAlreadyPaid(batchId);
        paid[batchId] = true; // effects before interactions

        address source = treasury;
        uint256 total;
        for (uint256 i; i < count; ) {
            address recipient = recipients[i];
            uint256 amount = amounts[i];
            if (recipient == address(0)) revert ZeroAddress();
            if (amount == 0) revert ZeroAmount(i);
            if (source == address(0)) {
                _call(abi.encodeCall(IERC20Minimal.transfer, (recipient, amount)), recipient, amount);
            } else {
                _call(abi.encodeCall(IERC20Minimal.transferFrom, (source, recipient, amount)), recipient, amount);
            }
            total += amount;
            unchecked {
                ++i;
            }
        }
        emit BatchPaid(batchId, count, total);
    }

    function setTreasury(address newTreasury) external onlyOwner {
        emit TreasuryChanged(treasury, newTreasury);
        treasury = newTreasury;
    }

    function transferOwnership(address newOwner) external onlyOwner {
        if (newOwner == address(0)) revert ZeroAddress();
        emit OwnershipTransferred(owner, newOwner);
        owner = newOwner;
    }

    /// @notice Send tokens held by this contract elsewhere (e.g. back to the treasury).
    function withdraw(address to, uint256 amount) external onlyOwner {
        _call(abi.encodeCall(IERC20Minimal.transfer, (to, amount)), to, amount);
    }

    /// SafeERC20-style call: accepts tokens that return nothing and tokens that return true.
    function _call(bytes memory data, address recipient, uint256 amount) private {
        (bool ok, bytes memory result) = address(token).call(data);
        bool accepted = result.length == 0 ? address(token).code.length != 0 : abi.decode(result, (bool));
        if (!ok || !accepted) {
            revert TokenTransferFailed(recipient, amount);
        }
    }
}
