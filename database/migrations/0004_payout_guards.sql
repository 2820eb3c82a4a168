-- 0004_payout_guards: the database itself refuses the changes that could let money move twice.
-- depends: 0003_coordinator
--
-- * far_payment_batches: only the transitions of the payout state machine are accepted (the same table as
--   TRANSITIONS in services/payouts/executor.py):
--       planned -> signed -> submitted -> confirmed, and planned | signed | submitted -> failed;
--   confirmed and failed are final. Once a batch is signed, its stored transaction (raw_tx, tx_hash, nonce) and its
--   batch_number never change. A signed, submitted or confirmed batch cannot be deleted (the foreign key's
--   ON DELETE SET NULL would silently detach its contributions).
-- * far_session_contributions: a contribution leaves its batch (payment_batch_id changes from a batch to NULL or to
--   another batch) only once that batch is failed. The contributions of a confirmed batch are paid and stay
--   attached forever; those of an open batch wait until the batch is failed (which releases them).

CREATE FUNCTION far_payment_batch_transition_ok(p_from text, p_to text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_from = p_to OR (p_from, p_to) IN (
        ('planned', 'signed'), ('planned', 'failed'),
        ('signed', 'submitted'), ('signed', 'failed'),
        ('submitted', 'confirmed'), ('submitted', 'failed'))
$$;
COMMENT ON FUNCTION far_payment_batch_transition_ok(text, text) IS
    'The legal state changes of a payout batch (mirrors TRANSITIONS in services/payouts/executor.py).';

CREATE FUNCTION far_payment_batches_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF OLD.state IN ('signed', 'submitted', 'confirmed') THEN
            RAISE EXCEPTION 'far_payment_batches: batch % is %; it cannot be deleted', OLD.batch_number, OLD.state
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN OLD;
    END IF;
    IF NOT far_payment_batch_transition_ok(OLD.state, NEW.state) THEN
        RAISE EXCEPTION 'far_payment_batches: illegal state change % -> % of batch %', OLD.state, NEW.state,
            OLD.batch_number USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.batch_number IS DISTINCT FROM OLD.batch_number THEN
        RAISE EXCEPTION 'far_payment_batches: batch_number of batch % is its on-chain batchId; it never changes',
            OLD.batch_number USING ERRCODE = 'check_violation';
    END IF;
    IF OLD.state <> 'planned' AND (NEW.raw_tx IS DISTINCT FROM OLD.raw_tx OR NEW.tx_hash IS DISTINCT FROM OLD.tx_hash
                                   OR NEW.nonce IS DISTINCT FROM OLD.nonce) THEN
        RAISE EXCEPTION 'far_payment_batches: batch % is %; its signed transaction is never replaced',
            OLD.batch_number, OLD.state USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION far_payment_batches_guard() IS
    'Trigger: legal state transitions only; the signed transaction is immutable; open/paid batches are not deleted.';
CREATE TRIGGER far_payment_batches_guard BEFORE UPDATE OR DELETE ON far_payment_batches
    FOR EACH ROW EXECUTE FUNCTION far_payment_batches_guard();

CREATE FUNCTION far_contributions_batch_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_state  text;
    v_number bigint;
BEGIN
    IF OLD.payment_batch_id IS NOT NULL AND NEW.payment_batch_id IS DISTINCT FROM OLD.payment_batch_id THEN
        SELECT state, batch_number INTO v_state, v_number
        FROM far_payment_batches WHERE batch_id = OLD.payment_batch_id;
        -- NOT FOUND: the batch row was deleted (only possible while planned or failed, see the batch guard) and
        -- this is the foreign key's ON DELETE SET NULL.
        IF FOUND AND v_state <> 'failed' THEN
            RAISE EXCEPTION 'far_session_contributions: contribution of % (session %) belongs to % batch %; only a '
                'failed batch releases its contributions', NEW.peer_id, NEW.session_id, v_state, v_number
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION far_contributions_batch_guard() IS
    'Trigger: a contribution is detached from its payout batch only once that batch is failed.';
CREATE TRIGGER far_session_contributions_batch_guard BEFORE UPDATE OF payment_batch_id ON far_session_contributions
    FOR EACH ROW EXECUTE FUNCTION far_contributions_batch_guard();
