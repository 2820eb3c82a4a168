-- Trust among strangers (docs/verification.md "Threat model"):
-- * a quarantine follows the identity that earns: the wallet of the quarantined peer (and so every registration of
--   that wallet, a fresh key included), not only its peer ID (view far_quarantined_peers);
-- * a proven cheater forfeits all its unpaid earnings: quarantine_peer() withholds every unpaid contribution of the
--   peer and of its wallet (withheld_reason 'forfeited'), and a contribution written later for a quarantined peer
--   or wallet is forfeited as it is inserted;
-- * an inconclusive check holds the checked contribution (held_at): the payout planner skips it until the check is
--   settled (released, or disputed);
-- * users get their money back: a finalized session in which a spot check proved a server's output wrong is
--   refunded to the account (far_account_ledger kind 'refund', one per session), whether the proof lands during
--   the session (at finalize) or after it.

-- ---------------------------------------------------------------------------------------------------------------
-- Quarantine by wallet
-- ---------------------------------------------------------------------------------------------------------------
ALTER TABLE far_quarantine ADD COLUMN wallet_address text;
ALTER TABLE far_quarantine_lifts ADD COLUMN wallet_address text;
CREATE INDEX far_quarantine_wallet_idx ON far_quarantine (lower(wallet_address)) WHERE wallet_address IS NOT NULL;
COMMENT ON COLUMN far_quarantine.wallet_address IS
    'The wallet the peer was registered with when quarantined: every peer of that wallet is quarantined too.';

-- Every peer that must not be routed through: the quarantined peers, and every registration of a quarantined
-- wallet (quarantined_peer_id names the peer whose quarantine covers it; lifting that one lifts them all).
CREATE VIEW far_quarantined_peers AS
    SELECT DISTINCT ON (peer_id) peer_id, quarantined_peer_id, wallet_address, reason, failed_checks, quarantined_at
      FROM (SELECT q.peer_id, q.peer_id AS quarantined_peer_id, q.wallet_address, q.reason, q.failed_checks,
                   q.quarantined_at, 0 AS rank
              FROM far_quarantine q
            UNION ALL
            SELECT n.peer_id, q.peer_id, q.wallet_address,
                   'wallet ' || q.wallet_address || ' is quarantined (peer ' || q.peer_id || '): ' || q.reason,
                   q.failed_checks, q.quarantined_at, 1
              FROM far_quarantine q JOIN far_nodes n ON lower(n.wallet_address) = lower(q.wallet_address)) x
     ORDER BY peer_id, rank, quarantined_at;
COMMENT ON VIEW far_quarantined_peers IS
    'Peers no coordinator routes through: quarantined peers and every peer registered with a quarantined wallet.';

CREATE OR REPLACE FUNCTION far_quarantine_record_lift() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO far_quarantine_lifts (peer_id, wallet_address, reason, failed_checks, quarantined_at, lifted_by,
                                      lift_reason)
    VALUES (OLD.peer_id, OLD.wallet_address, OLD.reason, OLD.failed_checks, OLD.quarantined_at,
            coalesce(nullif(current_setting('far_mesh.lifted_by', true), ''), session_user::text),
            coalesce(nullif(current_setting('far_mesh.lift_reason', true), ''),
                     'deleted from far_quarantine directly (no reason given)'));
    RETURN OLD;
END;
$$;

-- ---------------------------------------------------------------------------------------------------------------
-- Forfeiture and holds
-- ---------------------------------------------------------------------------------------------------------------
ALTER TABLE far_session_contributions
    ADD COLUMN withheld_reason text CHECK (withheld_reason IN ('disputed', 'forfeited')),
    ADD COLUMN held_at timestamptz,
    ADD COLUMN held_reason text;
UPDATE far_session_contributions SET withheld_reason = 'disputed' WHERE disputed_at IS NOT NULL;
ALTER TABLE far_session_contributions
    ADD CONSTRAINT far_session_contributions_withheld_reason CHECK (withheld_reason IS NULL OR disputed_at IS NOT NULL);
COMMENT ON COLUMN far_session_contributions.withheld_reason IS
    'Why the contribution is not paid: disputed (a spot check proved this work wrong) or forfeited (its peer or '
    'wallet was quarantined: every unpaid contribution is forfeited).';
COMMENT ON COLUMN far_session_contributions.held_at IS
    'Held unpaid: a spot check of this work was inconclusive and is not settled yet (the planner skips it).';

-- A dispute names its reason; a contribution written for a quarantined peer or wallet is forfeited at once (a
-- coordinator that has not synced the quarantine yet, or a session that was running when it was written).
CREATE FUNCTION far_contributions_withheld_reason() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_reason text;
BEGIN
    IF TG_OP = 'INSERT' AND NEW.disputed_at IS NULL AND NEW.payment_batch_id IS NULL THEN
        SELECT q.reason INTO v_reason FROM far_quarantine q
         WHERE q.peer_id = NEW.peer_id
            OR (NEW.wallet_address IS NOT NULL AND lower(q.wallet_address) = lower(NEW.wallet_address))
         LIMIT 1;
        IF FOUND THEN
            NEW.disputed_at := now();
            NEW.dispute_reason := 'forfeited: quarantined: ' || v_reason;
            NEW.withheld_reason := 'forfeited';
        END IF;
    END IF;
    IF NEW.disputed_at IS NOT NULL AND NEW.withheld_reason IS NULL THEN
        NEW.withheld_reason := 'disputed';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER far_contributions_withheld_reason BEFORE INSERT OR UPDATE ON far_session_contributions
    FOR EACH ROW EXECUTE FUNCTION far_contributions_withheld_reason();

-- Forfeit every unpaid (not batched) contribution of a peer and of a wallet: disputed with reason 'forfeited',
-- the payment of a finalized session moved to withheld_far (a running session's is withheld at finalize by
-- far_sessions_withhold_on_finalize). Returns the FAR withheld from finalized sessions by this call.
CREATE FUNCTION far_forfeit_unpaid(p_peer_id text, p_wallet text, p_reason text) RETURNS numeric
LANGUAGE plpgsql AS $$
DECLARE
    v_withheld numeric;
BEGIN
    UPDATE far_session_contributions c
       SET disputed_at = coalesce(c.disputed_at, now()),
           dispute_reason = coalesce(c.dispute_reason, 'forfeited: ' || p_reason),
           withheld_reason = coalesce(c.withheld_reason, 'forfeited')
     WHERE c.payment_batch_id IS NULL
       AND (c.peer_id = p_peer_id OR (p_wallet IS NOT NULL AND lower(c.wallet_address) = lower(p_wallet)));
    WITH moved AS (
        UPDATE far_session_contributions c
           SET withheld_far = c.withheld_far + c.payment_far, payment_far = 0
          FROM far_mesh_sessions s
         WHERE s.session_id = c.session_id AND s.finalized_at IS NOT NULL
           AND c.disputed_at IS NOT NULL AND c.payment_batch_id IS NULL AND c.payment_far > 0
           AND (c.peer_id = p_peer_id OR (p_wallet IS NOT NULL AND lower(c.wallet_address) = lower(p_wallet)))
        RETURNING c.withheld_far)
    SELECT coalesce(sum(withheld_far), 0) INTO v_withheld FROM moved;
    RETURN v_withheld;
END;
$$;

-- Quarantine a peer and its wallet (from far_nodes, when registered) and forfeit their unpaid earnings, in one
-- transaction. Returns the FAR forfeited from finalized sessions.
CREATE FUNCTION quarantine_peer(p_peer_id text, p_reason text, p_failed_checks int) RETURNS numeric
LANGUAGE plpgsql AS $$
DECLARE
    v_wallet text;
BEGIN
    SELECT n.wallet_address INTO v_wallet FROM far_nodes n WHERE n.peer_id = p_peer_id;
    INSERT INTO far_quarantine (peer_id, wallet_address, reason, failed_checks)
    VALUES (p_peer_id, v_wallet, p_reason, p_failed_checks)
    ON CONFLICT (peer_id) DO UPDATE
       SET failed_checks = excluded.failed_checks,
           wallet_address = coalesce(far_quarantine.wallet_address, excluded.wallet_address);
    RETURN far_forfeit_unpaid(p_peer_id, v_wallet, p_reason);
END;
$$;

-- Hold a contribution unpaid while its check is unsettled (created when the session has not checkpointed the
-- peer yet, like dispute_contribution()); release it when the check passes.
CREATE FUNCTION far_hold_contribution(p_session_id uuid, p_peer_id text, p_blocks text, p_reason text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE far_session_contributions c SET held_at = coalesce(c.held_at, now()), held_reason = p_reason
     WHERE c.session_id = p_session_id AND c.peer_id = p_peer_id;
    IF NOT FOUND THEN
        INSERT INTO far_session_contributions AS c (session_id, peer_id, node_id, wallet_address, blocks, held_at,
                                                   held_reason)
        SELECT p_session_id, p_peer_id, n.node_id, n.wallet_address, p_blocks, now(), p_reason
          FROM (SELECT 1) one LEFT JOIN far_nodes n ON n.peer_id = p_peer_id
        ON CONFLICT (session_id, peer_id) DO UPDATE SET held_at = coalesce(c.held_at, now()), held_reason = p_reason;
    END IF;
END;
$$;

-- ---------------------------------------------------------------------------------------------------------------
-- Refunds of sessions proven wrong
-- ---------------------------------------------------------------------------------------------------------------
-- (no foreign key: sessions are kept forever, and the ledger must not pin them for maintenance)
ALTER TABLE far_account_ledger ADD COLUMN session_id uuid UNIQUE;
ALTER TABLE far_account_ledger DROP CONSTRAINT far_account_ledger_kind_check;
ALTER TABLE far_account_ledger
    ADD CONSTRAINT far_account_ledger_kind_check CHECK (kind IN ('deposit', 'grant', 'opening', 'refund')),
    ADD CONSTRAINT far_account_ledger_refund_session CHECK ((kind = 'refund') = (session_id IS NOT NULL));
COMMENT ON COLUMN far_account_ledger.session_id IS
    'refund: the session whose charge is given back (a spot check proved a server''s output wrong); one per session.';

-- Refund a finalized session's charge when a spot check of it failed (the proof): a 'refund' ledger entry and the
-- balance, once per session. Returns the amount refunded (0: nothing to refund, or already refunded).
CREATE FUNCTION far_refund_session(p_session_id uuid, p_note text) RETURNS numeric
LANGUAGE plpgsql AS $$
DECLARE
    s far_mesh_sessions;
    v_balance numeric;
BEGIN
    SELECT * INTO s FROM far_mesh_sessions WHERE session_id = p_session_id FOR UPDATE;
    IF NOT FOUND OR s.finalized_at IS NULL OR s.account_id IS NULL OR coalesce(s.cost_far, 0) <= 0
       OR NOT EXISTS (SELECT 1 FROM far_spot_checks k WHERE k.session_id = p_session_id AND k.outcome = 'failed')
       OR EXISTS (SELECT 1 FROM far_account_ledger l WHERE l.session_id = p_session_id) THEN
        RETURN 0;
    END IF;
    UPDATE far_accounts SET balance_far = balance_far + s.cost_far WHERE account_id = s.account_id
        RETURNING balance_far INTO v_balance;
    INSERT INTO far_account_ledger (account_id, kind, amount_far, session_id, note, balance_after_far)
    VALUES (s.account_id, 'refund', s.cost_far, p_session_id, p_note, v_balance);
    RETURN s.cost_far;
END;
$$;

-- The proof landed while the session ran: refunded as it is finalized.
CREATE FUNCTION far_sessions_refund_on_finalize() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.finalized_at IS NULL AND NEW.finalized_at IS NOT NULL THEN
        PERFORM far_refund_session(NEW.session_id, 'a spot check proved a server''s output wrong during the session');
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER far_sessions_refund_on_finalize AFTER UPDATE OF finalized_at ON far_mesh_sessions
    FOR EACH ROW EXECUTE FUNCTION far_sessions_refund_on_finalize();
