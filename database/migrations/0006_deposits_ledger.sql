-- 0006_deposits_ledger: on-chain deposits (FarDeposit events) and the append-only ledger of account credits.
-- depends: 0005_request_id_per_account
--
-- * far_deposits: one row per FINAL Deposit event (PAYOUT_CONFIRMATIONS deep when the watcher read it), keyed by
--   (chain_id, tx_hash, log_index): a second credit of the same event is a unique violation. A deposit whose
--   accountRef names no account is kept as 'unmatched' (not credited; an operator refunds or credits it).
-- * far_deposit_cursors: per (chain, contract), the last block the watcher has fully processed and its hash; it
--   moves in the same transaction as the credits of the blocks it covers.
-- * far_account_ledger: every credit to an account's balance (deposit, operator grant, opening balance), append-
--   only (UPDATE, DELETE and TRUNCATE are refused). Charges are far_mesh_sessions.cost_far of finalized sessions.
--   far_credit_account() is the only writer of balance increases: ledger row + balance in one statement set.
-- * The audit invariant (docs/accounts.md): per account
--       Σ ledger credits = balance_far + Σ cost_far of its finalized sessions,
--   with balance_far = available + reserved_far. At migration time every existing account gets an 'opening'
--   entry for exactly that amount, so the invariant holds from here on.

CREATE TABLE far_deposit_cursors (
    chain_id          bigint NOT NULL,
    contract_address  text   NOT NULL CHECK (contract_address ~ '^0x[0-9a-f]{40}$'),
    last_block        bigint NOT NULL CHECK (last_block >= -1),
    last_block_hash   text,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chain_id, contract_address)
);
COMMENT ON TABLE far_deposit_cursors IS
    'Deposit watcher progress: last final block fully processed per (chain, deposit contract), with its hash.';

CREATE TABLE far_deposits (
    deposit_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chain_id          bigint NOT NULL,
    contract_address  text   NOT NULL CHECK (contract_address ~ '^0x[0-9a-f]{40}$'),
    tx_hash           text   NOT NULL CHECK (tx_hash ~ '^0x[0-9a-f]{64}$'),
    log_index         int    NOT NULL CHECK (log_index >= 0),
    block_number      bigint NOT NULL CHECK (block_number >= 0),
    block_hash        text   NOT NULL CHECK (block_hash ~ '^0x[0-9a-f]{64}$'),
    account_ref       text   NOT NULL CHECK (account_ref ~ '^0x[0-9a-f]{64}$'),
    account_id        uuid REFERENCES far_accounts (account_id),
    from_address      text   NOT NULL CHECK (from_address ~ '^0x[0-9a-fA-F]{40}$'),
    amount_base       numeric(78,0) NOT NULL CHECK (amount_base > 0),
    amount_far        numeric(38,18) NOT NULL CHECK (amount_far > 0),
    state             text NOT NULL CHECK (state IN ('credited', 'unmatched')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT far_deposits_event_once UNIQUE (chain_id, tx_hash, log_index),
    CONSTRAINT far_deposits_base_matches CHECK (amount_base = amount_far * 1000000000000000000),
    CONSTRAINT far_deposits_credited_has_account CHECK ((state = 'credited') = (account_id IS NOT NULL))
);
CREATE INDEX far_deposits_account_idx ON far_deposits (account_id, block_number) WHERE account_id IS NOT NULL;
COMMENT ON TABLE far_deposits IS
    'Final on-chain Deposit events, once per (chain_id, tx_hash, log_index); credited to account_id or unmatched.';
COMMENT ON COLUMN far_deposits.account_ref IS 'bytes32 accountRef of the event (0x + 64 hex): the account UUID right-aligned.';

CREATE TABLE far_account_ledger (
    entry_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id   uuid NOT NULL REFERENCES far_accounts (account_id),
    kind         text NOT NULL CHECK (kind IN ('deposit', 'grant', 'opening')),
    amount_far   numeric(38,18) NOT NULL CHECK (amount_far > 0),
    deposit_id   bigint UNIQUE REFERENCES far_deposits (deposit_id),
    note         text,
    balance_after_far numeric(38,18) NOT NULL CHECK (balance_after_far >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT far_account_ledger_deposit_kind CHECK ((kind = 'deposit') = (deposit_id IS NOT NULL))
);
CREATE INDEX far_account_ledger_account_idx ON far_account_ledger (account_id, entry_id);
COMMENT ON TABLE far_account_ledger IS
    'Append-only: every credit to an account balance (deposit, grant, opening). Charges are finalized sessions.';

CREATE FUNCTION far_ledger_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%: append-only (% refused)', TG_TABLE_NAME, TG_OP USING ERRCODE = 'check_violation';
END;
$$;
COMMENT ON FUNCTION far_ledger_append_only() IS 'Trigger: refuses UPDATE, DELETE and TRUNCATE of money records.';
CREATE TRIGGER far_account_ledger_append_only BEFORE UPDATE OR DELETE ON far_account_ledger
    FOR EACH ROW EXECUTE FUNCTION far_ledger_append_only();
CREATE TRIGGER far_account_ledger_no_truncate BEFORE TRUNCATE ON far_account_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION far_ledger_append_only();
CREATE TRIGGER far_deposits_append_only BEFORE UPDATE OR DELETE ON far_deposits
    FOR EACH ROW EXECUTE FUNCTION far_ledger_append_only();
CREATE TRIGGER far_deposits_no_truncate BEFORE TRUNCATE ON far_deposits
    FOR EACH STATEMENT EXECUTE FUNCTION far_ledger_append_only();

-- far_credit_account(): the one way money enters an account: a ledger row and the balance, together.
CREATE FUNCTION far_credit_account(p_account_id uuid, p_amount numeric, p_kind text, p_deposit_id bigint DEFAULT NULL,
                                   p_note text DEFAULT NULL) RETURNS far_account_ledger
LANGUAGE plpgsql AS $$
DECLARE
    v_balance numeric;
    v_entry far_account_ledger;
BEGIN
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION 'far_credit_account: amount must be positive, got %', p_amount
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE far_accounts SET balance_far = balance_far + p_amount WHERE account_id = p_account_id
        RETURNING balance_far INTO v_balance;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'far_credit_account: no account %', p_account_id USING ERRCODE = 'no_data_found';
    END IF;
    INSERT INTO far_account_ledger (account_id, kind, amount_far, deposit_id, note, balance_after_far)
    VALUES (p_account_id, p_kind, p_amount, p_deposit_id, p_note, v_balance)
    RETURNING * INTO v_entry;
    RETURN v_entry;
END;
$$;
COMMENT ON FUNCTION far_credit_account(uuid, numeric, text, bigint, text) IS
    'Credits an account: balance_far += amount and one far_account_ledger row, in the caller''s transaction.';

-- Opening entries: what every existing account has received so far = its balance + what it has been charged.
INSERT INTO far_account_ledger (account_id, kind, amount_far, note, balance_after_far)
SELECT a.account_id, 'opening', a.balance_far + coalesce(c.charged, 0), 'balance before deposits existed (0006)',
       a.balance_far
FROM far_accounts a
LEFT JOIN (SELECT account_id, sum(cost_far) AS charged FROM far_mesh_sessions
           WHERE account_id IS NOT NULL AND finalized_at IS NOT NULL GROUP BY account_id) c USING (account_id)
WHERE a.balance_far + coalesce(c.charged, 0) > 0;
