-- 0001_initial: the Far Mesh schema (nodes, accounts, sessions, contributions, payout batches).
--
-- Applied by `far-mesh db migrate` (yoyo-migrations, one transaction per file, recorded in
-- _yoyo_migration). Never edit an applied file: add 0002_..., 0003_... instead.
--
-- Money: every FAR amount is NUMERIC(38,18) (FAR has 18 decimals, so 1e-18 FAR = 1 base unit, the
-- on-chain integer). Amounts are only ever added, subtracted and multiplied by integers, never divided
-- inexactly; the one split (finalize_session) is done with integer div() in base units.

-- ---------------------------------------------------------------------------------------------------
-- Shared trigger: keep updated_at current on every UPDATE.
-- ---------------------------------------------------------------------------------------------------
CREATE FUNCTION far_set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION far_set_updated_at() IS 'Trigger: sets updated_at = now() on UPDATE.';

-- ---------------------------------------------------------------------------------------------------
-- far_nodes: provider nodes registered with the discovery service. One row per libp2p peer ID; a node
-- that re-registers with the same peer ID updates its row (node_id is stable).
-- ---------------------------------------------------------------------------------------------------
CREATE TABLE far_nodes (
    node_id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    peer_id          text NOT NULL UNIQUE,
    wallet_address   text NOT NULL CHECK (wallet_address ~ '^0x[0-9a-fA-F]{40}$'),
    model_id         text NOT NULL CHECK (model_id <> ''),
    start_block      int  NOT NULL,
    end_block        int  NOT NULL,
    public_name      text,
    hardware         jsonb NOT NULL DEFAULT '{}'::jsonb,
    public_key       bytea,
    node_token_hash  text,
    state            text NOT NULL DEFAULT 'online' CHECK (state IN ('online', 'offline', 'unregistered')),
    tokens_served    bigint NOT NULL DEFAULT 0 CHECK (tokens_served >= 0),
    vram_used_gb     numeric CHECK (vram_used_gb IS NULL OR vram_used_gb >= 0),
    gpu_temp_c       numeric,
    registered_at    timestamptz NOT NULL DEFAULT now(),
    last_seen        timestamptz NOT NULL DEFAULT now(),
    unregistered_at  timestamptz,
    CONSTRAINT far_nodes_block_range CHECK (start_block >= 0 AND end_block > start_block)
);
CREATE INDEX far_nodes_wallet_idx ON far_nodes (wallet_address);
CREATE INDEX far_nodes_model_idx ON far_nodes (model_id);
CREATE INDEX far_nodes_state_seen_idx ON far_nodes (state, last_seen);
COMMENT ON TABLE far_nodes IS 'Provider nodes (one per libp2p peer ID) registered through the discovery service.';
COMMENT ON COLUMN far_nodes.wallet_address IS 'BSC address (0x + 40 hex) that receives this node''s FAR payouts.';
COMMENT ON COLUMN far_nodes.start_block IS 'First transformer block served (inclusive).';
COMMENT ON COLUMN far_nodes.end_block IS 'Last transformer block served (exclusive): the node serves [start_block, end_block).';
COMMENT ON COLUMN far_nodes.node_token_hash IS 'Hash of the bearer token issued at registration (never the token itself).';
COMMENT ON COLUMN far_nodes.tokens_served IS 'Counter last reported by the node''s heartbeat (absolute, as reported).';
COMMENT ON COLUMN far_nodes.unregistered_at IS 'Maintained by trigger: set when state becomes ''unregistered'', NULL otherwise.';

-- Keep unregistered_at consistent with state, so callers only ever write state (re-registering a peer
-- clears it, unregistering stamps it once).
CREATE FUNCTION far_nodes_unregistered_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'unregistered' THEN
        IF TG_OP = 'UPDATE' AND OLD.state = 'unregistered' THEN
            NEW.unregistered_at := coalesce(NEW.unregistered_at, OLD.unregistered_at);
        END IF;
        NEW.unregistered_at := coalesce(NEW.unregistered_at, now());
    ELSE
        NEW.unregistered_at := NULL;
    END IF;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION far_nodes_unregistered_at() IS 'Trigger: unregistered_at follows state.';
CREATE TRIGGER far_nodes_unregistered_at BEFORE INSERT OR UPDATE ON far_nodes
    FOR EACH ROW EXECUTE FUNCTION far_nodes_unregistered_at();

-- ---------------------------------------------------------------------------------------------------
-- far_accounts / far_api_keys: prepaid accounts and their API keys (fl_...). Keys are stored hashed.
-- ---------------------------------------------------------------------------------------------------
CREATE TABLE far_accounts (
    account_id    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name          text NOT NULL,
    balance_far   numeric(38,18) NOT NULL DEFAULT 0 CHECK (balance_far >= 0),
    reserved_far  numeric(38,18) NOT NULL DEFAULT 0 CHECK (reserved_far >= 0),
    created_at    timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE far_accounts IS 'Prepaid accounts. balance_far is the money held; reserved_far the part held for running sessions.';
COMMENT ON COLUMN far_accounts.reserved_far IS 'Sum of far_mesh_sessions.reserved_far of this account''s running sessions.';

CREATE TABLE far_api_keys (
    key_id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id             uuid NOT NULL REFERENCES far_accounts (account_id) ON DELETE CASCADE,
    name                   text,
    key_prefix             text NOT NULL,
    key_hash               text NOT NULL UNIQUE,
    rate_limit_per_minute  int  NOT NULL DEFAULT 600 CHECK (rate_limit_per_minute > 0),
    created_at             timestamptz NOT NULL DEFAULT now(),
    revoked_at             timestamptz
);
CREATE INDEX far_api_keys_account_idx ON far_api_keys (account_id);
COMMENT ON TABLE far_api_keys IS 'API keys (fl_...) of accounts; only a hash and a short display prefix are stored.';
COMMENT ON COLUMN far_api_keys.revoked_at IS 'NULL while the key is valid.';

-- ---------------------------------------------------------------------------------------------------
-- far_mesh_sessions: one generation request. Prices and fee are copied from the configuration when the
-- session starts, so later price changes never re-price it. Money fields are set by finalize_session().
-- ---------------------------------------------------------------------------------------------------
CREATE TABLE far_mesh_sessions (
    session_id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    request_id                  text NOT NULL UNIQUE,
    account_id                  uuid REFERENCES far_accounts (account_id),
    user_wallet                 text CHECK (user_wallet IS NULL OR user_wallet ~ '^0x[0-9a-fA-F]{40}$'),
    model_id                    text NOT NULL,
    status                      text NOT NULL DEFAULT 'running'
                                CHECK (status IN ('running', 'completed', 'cancelled', 'failed', 'interrupted')),
    finish_reason               text,
    prompt_tokens               int NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens           int NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    price_per_token_far         numeric(38,18) NOT NULL CHECK (price_per_token_far >= 0),
    price_per_prompt_token_far  numeric(38,18) NOT NULL CHECK (price_per_prompt_token_far >= 0),
    platform_fee_bps            int NOT NULL CHECK (platform_fee_bps BETWEEN 0 AND 10000),
    reserved_far                numeric(38,18) NOT NULL DEFAULT 0 CHECK (reserved_far >= 0),
    cost_far                    numeric(38,18) CHECK (cost_far IS NULL OR cost_far >= 0),
    fee_far                     numeric(38,18) CHECK (fee_far IS NULL OR fee_far >= 0),
    coordinator_id              text,
    error                       text,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    finalized_at                timestamptz,
    -- A finalized session has a terminal status and both money fields; a running one has neither.
    CONSTRAINT far_mesh_sessions_finalized CHECK (
        (finalized_at IS NULL AND status = 'running' AND cost_far IS NULL AND fee_far IS NULL)
        OR (finalized_at IS NOT NULL AND status <> 'running' AND cost_far IS NOT NULL AND fee_far IS NOT NULL)
    ),
    CONSTRAINT far_mesh_sessions_fee_le_cost CHECK (fee_far IS NULL OR fee_far <= cost_far)
);
CREATE INDEX far_mesh_sessions_account_idx ON far_mesh_sessions (account_id) WHERE account_id IS NOT NULL;
CREATE INDEX far_mesh_sessions_wallet_idx ON far_mesh_sessions (user_wallet) WHERE user_wallet IS NOT NULL;
CREATE INDEX far_mesh_sessions_running_idx ON far_mesh_sessions (created_at) WHERE status = 'running';
CREATE INDEX far_mesh_sessions_finalized_idx ON far_mesh_sessions (finalized_at) WHERE finalized_at IS NOT NULL;
CREATE TRIGGER far_mesh_sessions_updated_at BEFORE UPDATE ON far_mesh_sessions
    FOR EACH ROW EXECUTE FUNCTION far_set_updated_at();
COMMENT ON TABLE far_mesh_sessions IS 'Generation sessions; money fields are written once, by finalize_session().';
COMMENT ON COLUMN far_mesh_sessions.request_id IS 'Client idempotency key (or generated); unique.';
COMMENT ON COLUMN far_mesh_sessions.reserved_far IS 'Prepaid balance held on the account while the session runs.';
COMMENT ON COLUMN far_mesh_sessions.cost_far IS 'Charged amount = fee_far + sum(payment_far of its contributions), exactly.';
COMMENT ON COLUMN far_mesh_sessions.status IS 'running until finalize_session(); interrupted = coordinator died mid-session.';

-- ---------------------------------------------------------------------------------------------------
-- Payout batches (declared before contributions, which reference them). One batch = one payBatch()
-- transaction of the payout contract; batch_number is its on-chain uint batchId.
-- ---------------------------------------------------------------------------------------------------
CREATE SEQUENCE far_payment_batch_number_seq AS bigint START WITH 1 MINVALUE 1;
COMMENT ON SEQUENCE far_payment_batch_number_seq IS 'On-chain batchId values; never reused (the contract rejects a seen batchId).';

CREATE TABLE far_payment_batches (
    batch_id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    batch_number     bigint NOT NULL UNIQUE DEFAULT nextval('far_payment_batch_number_seq'),
    network          text NOT NULL,
    state            text NOT NULL DEFAULT 'planned'
                     CHECK (state IN ('planned', 'signed', 'submitted', 'confirmed', 'failed')),
    cutoff           timestamptz NOT NULL,
    total_far        numeric(38,18) NOT NULL CHECK (total_far >= 0),
    recipient_count  int NOT NULL CHECK (recipient_count >= 0),
    from_address     text,
    nonce            bigint CHECK (nonce IS NULL OR nonce >= 0),
    raw_tx           bytea,
    tx_hash          text,
    gas_limit        bigint,
    block_number     bigint,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    confirmed_at     timestamptz,
    -- Crash safety: a batch is only 'signed' or later once its raw tx, hash and nonce are stored.
    CONSTRAINT far_payment_batches_signed_has_tx CHECK (
        state IN ('planned', 'failed') OR (raw_tx IS NOT NULL AND tx_hash IS NOT NULL AND nonce IS NOT NULL)
    ),
    CONSTRAINT far_payment_batches_confirmed_at CHECK (state <> 'confirmed' OR confirmed_at IS NOT NULL)
);
ALTER SEQUENCE far_payment_batch_number_seq OWNED BY far_payment_batches.batch_number;
CREATE UNIQUE INDEX far_payment_batches_tx_hash_idx ON far_payment_batches (tx_hash) WHERE tx_hash IS NOT NULL;
CREATE INDEX far_payment_batches_open_idx ON far_payment_batches (state) WHERE state IN ('planned', 'signed', 'submitted');
CREATE TRIGGER far_payment_batches_updated_at BEFORE UPDATE ON far_payment_batches
    FOR EACH ROW EXECUTE FUNCTION far_set_updated_at();
COMMENT ON TABLE far_payment_batches IS 'Weekly payout batches: planned -> signed (raw tx stored before broadcast) -> submitted -> confirmed | failed.';
COMMENT ON COLUMN far_payment_batches.batch_number IS 'The uint batchId passed to payBatch(); from far_payment_batch_number_seq.';

CREATE TABLE far_payment_batch_items (
    batch_id        uuid NOT NULL REFERENCES far_payment_batches (batch_id) ON DELETE CASCADE,
    wallet_address  text NOT NULL CHECK (wallet_address ~ '^0x[0-9a-fA-F]{40}$'),
    amount_far      numeric(38,18) NOT NULL CHECK (amount_far > 0),
    amount_base     numeric(78,0) NOT NULL CHECK (amount_base > 0),
    session_count   int NOT NULL DEFAULT 0 CHECK (session_count >= 0),
    PRIMARY KEY (batch_id, wallet_address),
    -- amount_base is the on-chain uint256 amount: exactly amount_far * 10^18.
    CONSTRAINT far_payment_batch_items_base_matches CHECK (amount_base = amount_far * 1000000000000000000)
);
CREATE INDEX far_payment_batch_items_wallet_idx ON far_payment_batch_items (wallet_address);
COMMENT ON TABLE far_payment_batch_items IS 'One recipient of a batch: the wallet''s summed contributions.';

-- ---------------------------------------------------------------------------------------------------
-- far_session_contributions: work done by each peer in a session. Checkpointed (upserted with ABSOLUTE
-- totals) while the session runs, so a retried checkpoint never double counts; payment_far is set by
-- finalize_session(). node_id NULL = the peer is not registered: it earns nothing (its share goes to
-- the platform fee).
-- ---------------------------------------------------------------------------------------------------
CREATE TABLE far_session_contributions (
    session_id        uuid NOT NULL REFERENCES far_mesh_sessions (session_id) ON DELETE CASCADE,
    peer_id           text NOT NULL,
    node_id           uuid REFERENCES far_nodes (node_id),
    wallet_address    text CHECK (wallet_address IS NULL OR wallet_address ~ '^0x[0-9a-fA-F]{40}$'),
    blocks            text NOT NULL CHECK (blocks ~ '^[0-9]+:[0-9]+(,[0-9]+:[0-9]+)*$'),
    work_units        bigint NOT NULL DEFAULT 0 CHECK (work_units >= 0),
    steps             int NOT NULL DEFAULT 0 CHECK (steps >= 0),
    payment_far       numeric(38,18) NOT NULL DEFAULT 0 CHECK (payment_far >= 0),
    payment_batch_id  uuid REFERENCES far_payment_batches (batch_id) ON DELETE SET NULL,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, peer_id),
    CONSTRAINT far_session_contributions_unregistered_unpaid CHECK (node_id IS NOT NULL OR payment_far = 0)
);
CREATE INDEX far_session_contributions_node_idx ON far_session_contributions (node_id) WHERE node_id IS NOT NULL;
CREATE INDEX far_session_contributions_wallet_idx ON far_session_contributions (wallet_address);
CREATE INDEX far_session_contributions_batch_idx ON far_session_contributions (payment_batch_id)
    WHERE payment_batch_id IS NOT NULL;
COMMENT ON TABLE far_session_contributions IS 'Per (session, peer) work units; upserted with absolute totals; paid by finalize_session().';
COMMENT ON COLUMN far_session_contributions.work_units IS 'Sum over successful steps of (blocks computed) x (token positions); absolute total.';
COMMENT ON COLUMN far_session_contributions.blocks IS 'Spans served, "start:end" (end exclusive), comma-separated if several.';
COMMENT ON COLUMN far_session_contributions.node_id IS 'NULL = peer not registered: earns nothing, its share stays with the platform.';
COMMENT ON COLUMN far_session_contributions.payment_batch_id IS 'The payout batch that pays this contribution (NULL = not yet in a batch).';

-- Guard: once a session is finalized its work record is frozen. A late checkpoint (a retry racing with
-- finalize) is dropped with a NOTICE instead of changing units that were already paid out; updates that
-- only touch payout bookkeeping (payment_batch_id) go through; payment_far of a finalized session is
-- immutable (finalize_session writes it before it sets finalized_at).
CREATE FUNCTION far_contributions_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_finalized timestamptz;
BEGIN
    -- FOR KEY SHARE: waits for a finalize_session() holding the session FOR UPDATE (and makes it wait for
    -- us), so a checkpoint is either fully counted by finalize or dropped, never half-seen. It does not
    -- block ordinary updates of the session row.
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
        IF NEW.payment_far IS DISTINCT FROM OLD.payment_far THEN
            RAISE EXCEPTION 'payment_far of finalized session % is only written by finalize_session()', NEW.session_id
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION far_contributions_guard() IS 'Freezes the contributions of finalized sessions (late checkpoints are dropped).';
CREATE TRIGGER far_session_contributions_guard BEFORE INSERT OR UPDATE ON far_session_contributions
    FOR EACH ROW EXECUTE FUNCTION far_contributions_guard();

-- ---------------------------------------------------------------------------------------------------
-- active_far_nodes: nodes that are online and sent a heartbeat in the last 90 s (3 missed 30 s beats).
-- ---------------------------------------------------------------------------------------------------
CREATE VIEW active_far_nodes AS
    SELECT n.*
    FROM far_nodes n
    WHERE n.state = 'online'
      AND n.last_seen > now() - interval '90 seconds';
COMMENT ON VIEW active_far_nodes IS 'Registered nodes with state online and a heartbeat within the last 90 seconds.';

-- ---------------------------------------------------------------------------------------------------
-- node_earnings_summary: per node, what it did and what it earned.
--   earned_far  = payments of its contributions in finalized sessions
--   paid_far    = the part whose payout batch is confirmed on chain
--   pending_far = earned_far - paid_far (not yet in a batch, or in a batch not confirmed yet)
-- ---------------------------------------------------------------------------------------------------
CREATE VIEW node_earnings_summary AS
    SELECT n.node_id,
           n.peer_id,
           n.wallet_address,
           n.model_id,
           count(DISTINCT c.session_id)::bigint AS sessions,
           coalesce(sum(c.work_units), 0)::numeric AS work_units,
           coalesce(sum(c.payment_far) FILTER (WHERE s.finalized_at IS NOT NULL), 0)::numeric(38,18) AS earned_far,
           coalesce(sum(c.payment_far) FILTER (WHERE s.finalized_at IS NOT NULL AND b.state = 'confirmed'), 0)::numeric(38,18)
               AS paid_far,
           coalesce(sum(c.payment_far) FILTER (WHERE s.finalized_at IS NOT NULL
                                                 AND (b.state IS NULL OR b.state <> 'confirmed')), 0)::numeric(38,18)
               AS pending_far
    FROM far_nodes n
    LEFT JOIN far_session_contributions c ON c.node_id = n.node_id
    LEFT JOIN far_mesh_sessions s ON s.session_id = c.session_id
    LEFT JOIN far_payment_batches b ON b.batch_id = c.payment_batch_id
    GROUP BY n.node_id, n.peer_id, n.wallet_address, n.model_id;
COMMENT ON VIEW node_earnings_summary IS 'Per node: sessions, work units, earned/paid/pending FAR (paid = in a confirmed batch).';

-- ---------------------------------------------------------------------------------------------------
-- update_node_last_seen(): a node's heartbeat. Sets last_seen = now() and the reported values (NULL
-- arguments leave a value unchanged; state defaults to 'online', since a heartbeat proves the node is
-- up). Returns the new last_seen, or NULL when the node is unknown or unregistered (it must register
-- again; an unregistered node is never revived by a heartbeat).
-- ---------------------------------------------------------------------------------------------------
CREATE FUNCTION update_node_last_seen(
    p_node_id uuid,
    p_state text DEFAULT NULL,
    p_tokens_served bigint DEFAULT NULL,
    p_vram_used_gb numeric DEFAULT NULL,
    p_gpu_temp_c numeric DEFAULT NULL
) RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    v_seen timestamptz;
BEGIN
    IF p_state IS NOT NULL AND p_state NOT IN ('online', 'offline') THEN
        RAISE EXCEPTION 'update_node_last_seen: invalid state %', p_state USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE far_nodes
       SET last_seen = now(),
           state = coalesce(p_state, 'online'),
           tokens_served = coalesce(p_tokens_served, tokens_served),
           vram_used_gb = coalesce(p_vram_used_gb, vram_used_gb),
           gpu_temp_c = coalesce(p_gpu_temp_c, gpu_temp_c)
     WHERE node_id = p_node_id
       AND state <> 'unregistered'
    RETURNING last_seen INTO v_seen;
    RETURN v_seen;
END;
$$;
COMMENT ON FUNCTION update_node_last_seen(uuid, text, bigint, numeric, numeric)
    IS 'Heartbeat: last_seen = now() plus reported values; NULL if the node is unknown or unregistered.';

-- ---------------------------------------------------------------------------------------------------
-- finalize_session(): THE money computation. Idempotent: the first call finalizes; any later call
-- changes nothing and returns the stored row. Returns the session row (far_mesh_sessions).
--
-- In 1e-18 FAR base units, all integers, no division except integer div():
--   cost_base       = (completion_tokens * price_per_token_far + prompt_tokens * price_per_prompt_token_far) * 10^18
--   total_units     = sum(work_units) over ALL contributions of the session (registered or not)
--   payment_base(c) = div(cost_base * (10000 - bps) * c.work_units, 10000 * total_units)  if c.node_id IS NOT NULL
--                     0                                                                     if c.node_id IS NULL
--   fee             = cost - sum(payment)      (platform fee + rounding dust + unregistered peers' shares)
-- total_units = 0 => everything is fee. Asserts cost_far = fee_far + sum(payment_far) before returning.
-- ---------------------------------------------------------------------------------------------------
CREATE FUNCTION finalize_session(
    p_session_id uuid,
    p_status text,
    p_finish_reason text,
    p_prompt_tokens int,
    p_completion_tokens int
) RETURNS far_mesh_sessions
LANGUAGE plpgsql AS $$
DECLARE
    c_base CONSTANT numeric := 1000000000000000000;   -- base units per FAR (10^18)
    c_unit CONSTANT numeric := 0.000000000000000001;  -- FAR per base unit (exact literal, 10^-18)
    s far_mesh_sessions;
    v_cost numeric;
    v_cost_base numeric;
    v_total_units numeric;
    v_paid_base numeric;
    v_paid_far numeric;
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('completed', 'cancelled', 'failed', 'interrupted') THEN
        RAISE EXCEPTION 'finalize_session: status must be completed|cancelled|failed|interrupted, got %', p_status
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_prompt_tokens IS NULL OR p_prompt_tokens < 0 OR p_completion_tokens IS NULL OR p_completion_tokens < 0 THEN
        RAISE EXCEPTION 'finalize_session: token counts must be >= 0' USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- Serialize concurrent finalizers (and checkpoints) of this session.
    SELECT * INTO s FROM far_mesh_sessions WHERE session_id = p_session_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'finalize_session: unknown session %', p_session_id USING ERRCODE = 'no_data_found';
    END IF;
    IF s.finalized_at IS NOT NULL THEN
        RETURN s;  -- already final: idempotent
    END IF;

    v_cost := p_completion_tokens::numeric * s.price_per_token_far
            + p_prompt_tokens::numeric * s.price_per_prompt_token_far;
    v_cost_base := v_cost * c_base;
    IF v_cost_base <> trunc(v_cost_base) THEN  -- impossible with numeric(38,18) prices; guard anyway
        RAISE EXCEPTION 'finalize_session: cost % is not a whole number of base units', v_cost;
    END IF;

    SELECT coalesce(sum(work_units), 0) INTO v_total_units
      FROM far_session_contributions WHERE session_id = p_session_id;

    IF v_total_units > 0 THEN
        UPDATE far_session_contributions c
           SET payment_far = CASE
                   WHEN c.node_id IS NULL THEN 0
                   ELSE div(v_cost_base * (10000 - s.platform_fee_bps) * c.work_units,
                            10000 * v_total_units) * c_unit
               END
         WHERE c.session_id = p_session_id;
    ELSE
        UPDATE far_session_contributions c SET payment_far = 0 WHERE c.session_id = p_session_id;
    END IF;

    SELECT coalesce(sum(payment_far), 0) INTO v_paid_far
      FROM far_session_contributions WHERE session_id = p_session_id;
    v_paid_base := v_paid_far * c_base;

    UPDATE far_mesh_sessions
       SET status = p_status,
           finish_reason = p_finish_reason,
           prompt_tokens = p_prompt_tokens,
           completion_tokens = p_completion_tokens,
           cost_far = v_cost,
           fee_far = (v_cost_base - v_paid_base) * c_unit,
           finalized_at = now()
     WHERE session_id = p_session_id
    RETURNING * INTO s;

    -- The invariant, checked on the stored (rounded-to-column) values.
    IF s.cost_far <> s.fee_far + v_paid_far OR s.cost_far <> v_cost OR v_paid_base <> trunc(v_paid_base)
       OR v_paid_far > v_cost THEN
        RAISE EXCEPTION 'finalize_session: money invariant violated for % (cost %, fee %, paid %)',
            p_session_id, s.cost_far, s.fee_far, v_paid_far;
    END IF;
    RETURN s;
END;
$$;
COMMENT ON FUNCTION finalize_session(uuid, text, text, int, int)
    IS 'Idempotently finalizes a session: cost, per-contribution payments (integer base units, round down), fee = remainder.';
