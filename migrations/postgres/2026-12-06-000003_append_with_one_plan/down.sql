ALTER FUNCTION switchboard_append(TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], BOOLEAN[], TEXT[],
    INTEGER[], TIMESTAMP) RESET plan_cache_mode;
