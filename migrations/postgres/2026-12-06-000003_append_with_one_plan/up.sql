-- `switchboard_append` planned its main statement again on every call: PostgreSQL's plan cache
-- compares a generic plan's estimated cost with the custom plans' and, for this statement, kept
-- choosing custom ones, which cost about half a millisecond of planning per batch (a batch of
-- one message took 0.83 ms against 0.33 with the plan kept). The generic plan is the same shape
-- (index lookups in nested loops, sorts of the batch), so the function keeps it.
ALTER FUNCTION switchboard_append(TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], BOOLEAN[], TEXT[],
    INTEGER[], TIMESTAMP) SET plan_cache_mode = force_generic_plan;
