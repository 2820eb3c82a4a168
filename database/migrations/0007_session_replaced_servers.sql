-- Failover record of a session (issue 14): the servers that failed a step and what replaced them, as
-- [{"peer_id", "blocks", "cause": "died"|"hung"|"refused", "replaced_by": peer_id|null, "stall_ms"}].
ALTER TABLE far_mesh_sessions ADD COLUMN replaced_servers JSONB NOT NULL DEFAULT '[]'::jsonb;
COMMENT ON COLUMN far_mesh_sessions.replaced_servers IS
    'Servers replaced during the session (failover), with cause and stall; [] when none failed.';
