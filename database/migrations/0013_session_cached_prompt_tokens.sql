-- Prefix reuse (docs/prefix-reuse.md): how many of a session's prompt tokens were served from the attention
-- cache of a parked inference session of the same account instead of being computed again. Informational:
-- they are billed at PRICE_PER_PROMPT_TOKEN_FAR like any prompt token, and servers are paid only for the
-- positions they computed (their work units), so finalize_session() is unchanged.
ALTER TABLE far_mesh_sessions ADD COLUMN cached_prompt_tokens int NOT NULL DEFAULT 0
    CHECK (cached_prompt_tokens >= 0 AND cached_prompt_tokens <= prompt_tokens);
COMMENT ON COLUMN far_mesh_sessions.cached_prompt_tokens IS
    'Prompt tokens served from a parked session''s cache (usage.prompt_tokens_details.cached_tokens); 0 = none.';
