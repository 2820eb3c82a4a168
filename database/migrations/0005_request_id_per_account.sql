-- request_id is an idempotency key per account (issue 12): one account can no longer take, or learn about,
-- the request_id of another. Sessions without an account (NULL) share one namespace (NULLS NOT DISTINCT).
ALTER TABLE far_mesh_sessions DROP CONSTRAINT far_mesh_sessions_request_id_key;
CREATE UNIQUE INDEX far_mesh_sessions_account_request_id_key
    ON far_mesh_sessions (account_id, request_id) NULLS NOT DISTINCT;
CREATE INDEX far_mesh_sessions_request_id_idx ON far_mesh_sessions (request_id);
COMMENT ON COLUMN far_mesh_sessions.request_id IS 'Client idempotency key (or generated); unique per account.';
