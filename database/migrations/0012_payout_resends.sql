-- Payout re-sends (docs/payouts.md "Reorgs"): a batch whose transaction cannot be mined any more (it reverted, or
-- its nonce went to another transaction) is sent again with the SAME on-chain batchId, which FarPayout pays at most
-- once, instead of releasing its contributions to a new batchId. However deep a reorg, and whoever re-broadcasts
-- which of the stored transactions, a batch's contributions are paid once.
--
-- * far_payment_transactions: every transaction ever signed for a batch (the first one too), stored before it is
--   broadcast; append-only.
-- * far_payment_batches.paid_tx_hash: the transaction whose receipt confirmed the batch; finalized_at: when that
--   receipt was found at finalized depth. Until then every run re-reads it, and a batch whose payment a reorg
--   removed goes back from confirmed to submitted (its contributions stay attached) and is sent again.
-- * Only a planned batch (no transaction ever signed, so its batchId is on no transaction) can fail and release its
--   contributions; signed and submitted batches are re-sent, never failed.

CREATE TABLE far_payment_transactions (
    tx_hash     text PRIMARY KEY CHECK (tx_hash ~ '^0x[0-9a-f]{64}$'),
    batch_id    uuid NOT NULL REFERENCES far_payment_batches (batch_id),
    nonce       bigint NOT NULL CHECK (nonce >= 0),
    raw_tx      bytea NOT NULL,
    gas_limit   bigint NOT NULL CHECK (gas_limit > 0),
    signed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX far_payment_transactions_batch_idx ON far_payment_transactions (batch_id, nonce);
COMMENT ON TABLE far_payment_transactions IS
    'Every signed payBatch transaction of a batch (first send and re-sends, same batchId), stored before broadcast.';

CREATE FUNCTION far_payment_transactions_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'far_payment_transactions: signed transactions are never changed or deleted'
        USING ERRCODE = 'check_violation';
END;
$$;
CREATE TRIGGER far_payment_transactions_append_only BEFORE UPDATE OR DELETE ON far_payment_transactions
    FOR EACH ROW EXECUTE FUNCTION far_payment_transactions_append_only();

ALTER TABLE far_payment_batches
    ADD COLUMN paid_tx_hash  text CHECK (paid_tx_hash IS NULL OR paid_tx_hash ~ '^0x[0-9a-f]{64}$'),
    ADD COLUMN finalized_at  timestamptz;
COMMENT ON COLUMN far_payment_batches.paid_tx_hash IS 'The transaction (first send or re-send) that paid the batch.';
COMMENT ON COLUMN far_payment_batches.finalized_at IS 'When the paying receipt was seen at finalized depth.';

INSERT INTO far_payment_transactions (tx_hash, batch_id, nonce, raw_tx, gas_limit, signed_at)
SELECT lower(tx_hash), batch_id, nonce, raw_tx, coalesce(gas_limit, 1), created_at
FROM far_payment_batches WHERE raw_tx IS NOT NULL AND tx_hash IS NOT NULL AND nonce IS NOT NULL;
UPDATE far_payment_batches SET paid_tx_hash = lower(tx_hash) WHERE state = 'confirmed' AND tx_hash IS NOT NULL;

CREATE OR REPLACE FUNCTION far_payment_batch_transition_ok(p_from text, p_to text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_from = p_to OR (p_from, p_to) IN (
        ('planned', 'signed'), ('planned', 'failed'),
        ('signed', 'submitted'),
        ('submitted', 'confirmed'), ('confirmed', 'submitted'))
$$;
COMMENT ON FUNCTION far_payment_batch_transition_ok(text, text) IS
    'The legal state changes of a payout batch (mirrors TRANSITIONS in services/payouts/executor.py).';
