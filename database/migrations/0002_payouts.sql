-- 0002_payouts: bookkeeping the weekly payment tracker (services/payouts) needs beyond 0001.
-- depends: 0001_initial
--
-- * far_payment_batches records where a batch was signed for (chain id + payout contract), so a tracker
--   pointed at another chain or contract refuses to resume it, and the audit knows where to look; plus the
--   gas used and when the transaction was first broadcast.
-- * A partial index over the unpaid, payable contributions: what the planner aggregates and what a new
--   batch attaches (by lower(wallet_address)). Paid rows leave the index, so it stays small.

ALTER TABLE far_payment_batches
    ADD COLUMN chain_id          bigint,
    ADD COLUMN contract_address  text CHECK (contract_address IS NULL OR contract_address ~ '^0x[0-9a-fA-F]{40}$'),
    ADD COLUMN gas_used          bigint CHECK (gas_used IS NULL OR gas_used >= 0),
    ADD COLUMN submitted_at      timestamptz;
COMMENT ON COLUMN far_payment_batches.chain_id IS 'EIP-155 chain id the raw transaction was signed for (97 testnet, 56 mainnet).';
COMMENT ON COLUMN far_payment_batches.contract_address IS 'FarPayout contract whose payBatch() this batch calls.';
COMMENT ON COLUMN far_payment_batches.submitted_at IS 'First time the raw transaction was seen by the node (broadcast).';

CREATE INDEX far_session_contributions_unpaid_idx
    ON far_session_contributions (lower(wallet_address), session_id)
    WHERE payment_batch_id IS NULL AND node_id IS NOT NULL AND payment_far > 0;

