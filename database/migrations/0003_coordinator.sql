-- Coordinator additions: the generated text of a session (idempotent replays of a finished request_id return
-- it instead of generating and charging twice) and the error of a failed one.
ALTER TABLE far_mesh_sessions ADD COLUMN output_text text;
COMMENT ON COLUMN far_mesh_sessions.output_text IS 'Text returned to the client (stop sequences excluded); set when finalized.';
