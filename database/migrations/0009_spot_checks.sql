-- Spot checks (issue 17): the coordinator re-runs a sample of servers' steps on other servers. A server whose
-- outputs disagree with two others is the suspect of a failed check: its contributions in that session are
-- disputed (their payment is withheld and goes back to the platform; the user's charge does not change), and
-- repeated failures quarantine the peer (coordinators stop routing through it; discovery shows why).

-- One row per check (services/coordinator/verification.py). outcome: passed (checked = verifier within
-- tolerance), failed (the checked server is the outlier), verifier_failed (the verifier is the outlier),
-- inconclusive (a disagreement no third server could settle).
CREATE TABLE far_spot_checks (
    check_id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    session_id        uuid REFERENCES far_mesh_sessions (session_id) ON DELETE SET NULL,
    model_id          text NOT NULL,
    checked_peer_id   text NOT NULL,
    blocks            text NOT NULL CHECK (blocks ~ '^[0-9]+:[0-9]+$'),
    positions         int NOT NULL CHECK (positions > 0),
    prefix_length     int NOT NULL CHECK (prefix_length >= 0),
    verifier_peer_id  text NOT NULL,
    referee_peer_id   text,
    outcome           text NOT NULL CHECK (outcome IN ('passed', 'failed', 'verifier_failed', 'inconclusive')),
    suspect_peer_id   text,
    error             double precision NOT NULL,  -- max relative L2 distance checked vs verifier
    tolerance         double precision NOT NULL,
    dtype             text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT far_spot_checks_suspect CHECK ((outcome IN ('failed', 'verifier_failed')) = (suspect_peer_id IS NOT NULL))
);
CREATE INDEX far_spot_checks_checked_idx ON far_spot_checks (checked_peer_id, created_at);
CREATE INDEX far_spot_checks_suspect_idx ON far_spot_checks (suspect_peer_id) WHERE suspect_peer_id IS NOT NULL;
COMMENT ON TABLE far_spot_checks IS 'Redundant-execution checks of servers'' steps (passed / failed / verifier_failed / inconclusive).';
COMMENT ON COLUMN far_spot_checks.error IS 'max over checked positions of ||checked - verifier||_2 / ||verifier||_2.';

-- Quarantined peers (registered or not): coordinators do not route through them.
CREATE TABLE far_quarantine (
    peer_id         text PRIMARY KEY,
    reason          text NOT NULL,
    failed_checks   int NOT NULL CHECK (failed_checks > 0),
    quarantined_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE far_quarantine IS 'Peers that failed repeated spot checks; delete the row to lift the quarantine.';

-- Disputed contributions: their payment moves to withheld_far (never paid; kept by the platform).
ALTER TABLE far_session_contributions
    ADD COLUMN disputed_at     timestamptz,
    ADD COLUMN dispute_reason  text,
    ADD COLUMN withheld_far    numeric(38,18) NOT NULL DEFAULT 0 CHECK (withheld_far >= 0),
    ADD CONSTRAINT far_session_contributions_withheld_disputed CHECK (withheld_far = 0 OR disputed_at IS NOT NULL);
COMMENT ON COLUMN far_session_contributions.withheld_far IS
    'Payment withheld because the contribution is disputed (failed spot check): the platform keeps it. '
    'Conservation per finalized session: cost = fee + sum(payment_far) + sum(withheld_far).';

-- The guard of 0001, plus one allowed change of a finalized contribution: withholding a disputed, unbatched
-- payment (payment_far -> withheld_far, the sum unchanged).
CREATE OR REPLACE FUNCTION far_contributions_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_finalized timestamptz;
BEGIN
    SELECT finalized_at INTO v_finalized FROM far_mesh_sessions WHERE session_id = NEW.session_id FOR KEY SHARE;
    IF v_finalized IS NOT NULL THEN
        IF TG_OP = 'INSERT' THEN
            RAISE NOTICE 'far_session_contributions: session % is finalized, late contribution of % dropped',
                NEW.session_id, NEW.peer_id;
            RETURN NULL;
        END IF;
        IF NEW.work_units IS DISTINCT FROM OLD.work_units OR NEW.steps IS DISTINCT FROM OLD.steps
           OR NEW.node_id IS DISTINCT FROM OLD.node_id OR NEW.wallet_address IS DISTINCT FROM OLD.wallet_address
           OR NEW.blocks IS DISTINCT FROM OLD.blocks THEN
            RAISE NOTICE 'far_session_contributions: session % is finalized, late checkpoint of % dropped',
                NEW.session_id, NEW.peer_id;
            RETURN NULL;
        END IF;
        IF (NEW.payment_far IS DISTINCT FROM OLD.payment_far OR NEW.withheld_far IS DISTINCT FROM OLD.withheld_far)
           AND NOT (NEW.disputed_at IS NOT NULL AND OLD.payment_batch_id IS NULL AND NEW.payment_far = 0
                    AND NEW.withheld_far = OLD.withheld_far + OLD.payment_far) THEN
            RAISE EXCEPTION 'payment_far of finalized session % is only written by finalize_session() '
                            '(or withheld when disputed)', NEW.session_id USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END;
$$;

-- Withhold the payments of a finalized session's disputed contributions that are not in a payout batch yet.
CREATE FUNCTION far_withhold_disputed(p_session_id uuid) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    v_count int;
BEGIN
    UPDATE far_session_contributions
       SET withheld_far = withheld_far + payment_far, payment_far = 0
     WHERE session_id = p_session_id AND disputed_at IS NOT NULL AND payment_far > 0 AND payment_batch_id IS NULL
       AND EXISTS (SELECT 1 FROM far_mesh_sessions s WHERE s.session_id = p_session_id AND s.finalized_at IS NOT NULL);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;

-- Dispute a peer's contribution to a session, before or after the session is finalized (a check finishes
-- in the background, often after the stream). Returns the contribution's payment_batch_id: not NULL means
-- it was already in a payout batch and could not be withheld (the caller logs it).
CREATE FUNCTION dispute_contribution(p_session_id uuid, p_peer_id text, p_blocks text, p_reason text)
RETURNS TABLE (disputed boolean, payment_batch_id uuid)
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE far_session_contributions c
       SET disputed_at = coalesce(c.disputed_at, now()), dispute_reason = coalesce(c.dispute_reason, p_reason)
     WHERE c.session_id = p_session_id AND c.peer_id = p_peer_id;
    IF NOT FOUND THEN
        -- A running session may not have checkpointed this peer yet: the row is created (0 units), and the next
        -- checkpoint fills in the work (it never touches disputed_at). (In a finalized session the guard drops
        -- the insert: the peer earned nothing there.)
        INSERT INTO far_session_contributions AS c (session_id, peer_id, node_id, wallet_address, blocks,
                                                   disputed_at, dispute_reason)
        SELECT p_session_id, p_peer_id, n.node_id, n.wallet_address, p_blocks, now(), p_reason
          FROM (SELECT 1) one LEFT JOIN far_nodes n ON n.peer_id = p_peer_id
        ON CONFLICT (session_id, peer_id) DO UPDATE
           SET disputed_at = coalesce(c.disputed_at, excluded.disputed_at),
               dispute_reason = coalesce(c.dispute_reason, excluded.dispute_reason);
    END IF;
    PERFORM far_withhold_disputed(p_session_id);
    RETURN QUERY SELECT c.disputed_at IS NOT NULL, c.payment_batch_id FROM far_session_contributions c
                  WHERE c.session_id = p_session_id AND c.peer_id = p_peer_id;
END;
$$;

-- A session finalized after some of its contributions were disputed: withhold them at once.
CREATE FUNCTION far_sessions_withhold_on_finalize() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.finalized_at IS NULL AND NEW.finalized_at IS NOT NULL THEN
        PERFORM far_withhold_disputed(NEW.session_id);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER far_sessions_withhold_on_finalize AFTER UPDATE OF finalized_at ON far_mesh_sessions
    FOR EACH ROW EXECUTE FUNCTION far_sessions_withhold_on_finalize();
