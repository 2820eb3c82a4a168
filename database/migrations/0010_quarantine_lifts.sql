-- Lifting a quarantine (issue 17, docs/verification.md "Lifting a quarantine"): an operator's decision
-- (`far-mesh nodes unquarantine <peer_id> --reason TEXT`), recorded: who lifted it, when and why, with what the
-- quarantine was (reason, failed checks, since when). far_quarantine keeps meaning "quarantined now"; its history
-- is far_quarantine_lifts. Coordinators re-read far_quarantine every SPOT_CHECK_QUARANTINE_SYNC_S and route
-- through a lifted peer again.

CREATE TABLE far_quarantine_lifts (
    lift_id         bigserial PRIMARY KEY,
    peer_id         text NOT NULL,
    reason          text NOT NULL,                -- the quarantine's reason (far_quarantine.reason)
    failed_checks   int NOT NULL,
    quarantined_at  timestamptz NOT NULL,
    lifted_at       timestamptz NOT NULL DEFAULT now(),
    lifted_by       text NOT NULL CHECK (btrim(lifted_by) <> ''),
    lift_reason     text NOT NULL CHECK (btrim(lift_reason) <> '')
);
CREATE INDEX far_quarantine_lifts_peer_idx ON far_quarantine_lifts (peer_id, lifted_at);
COMMENT ON TABLE far_quarantine_lifts IS
    'Quarantines that were lifted (who, when, why); failed checks before a peer''s last lift do not count '
    'towards a new quarantine.';

-- Every row leaving far_quarantine is recorded, however it leaves: lift_quarantine() names who and why
-- (transaction-local settings far_mesh.lifted_by / far_mesh.lift_reason); a bare DELETE is recorded as one.
CREATE FUNCTION far_quarantine_record_lift() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO far_quarantine_lifts (peer_id, reason, failed_checks, quarantined_at, lifted_by, lift_reason)
    VALUES (OLD.peer_id, OLD.reason, OLD.failed_checks, OLD.quarantined_at,
            coalesce(nullif(current_setting('far_mesh.lifted_by', true), ''), session_user::text),
            coalesce(nullif(current_setting('far_mesh.lift_reason', true), ''),
                     'deleted from far_quarantine directly (no reason given)'));
    RETURN OLD;
END;
$$;
CREATE TRIGGER far_quarantine_record_lift AFTER DELETE ON far_quarantine
    FOR EACH ROW EXECUTE FUNCTION far_quarantine_record_lift();

-- Lift a peer's quarantine; returns the recorded lift. Raises no_data_found when the peer is not quarantined
-- and check_violation without a reason or an operator.
CREATE FUNCTION lift_quarantine(p_peer_id text, p_lifted_by text, p_reason text) RETURNS SETOF far_quarantine_lifts
LANGUAGE plpgsql AS $$
DECLARE
    v_lift_id bigint;
BEGIN
    IF p_reason IS NULL OR btrim(p_reason) = '' THEN
        RAISE EXCEPTION 'lifting a quarantine needs a reason' USING ERRCODE = 'check_violation';
    END IF;
    IF p_lifted_by IS NULL OR btrim(p_lifted_by) = '' THEN
        RAISE EXCEPTION 'lifting a quarantine needs the operator''s name' USING ERRCODE = 'check_violation';
    END IF;
    PERFORM set_config('far_mesh.lifted_by', p_lifted_by, true);
    PERFORM set_config('far_mesh.lift_reason', p_reason, true);
    DELETE FROM far_quarantine WHERE peer_id = p_peer_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'peer % is not quarantined', p_peer_id USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM set_config('far_mesh.lifted_by', '', true);
    PERFORM set_config('far_mesh.lift_reason', '', true);
    SELECT max(l.lift_id) INTO v_lift_id FROM far_quarantine_lifts l WHERE l.peer_id = p_peer_id;
    RETURN QUERY SELECT * FROM far_quarantine_lifts l WHERE l.lift_id = v_lift_id;
END;
$$;
