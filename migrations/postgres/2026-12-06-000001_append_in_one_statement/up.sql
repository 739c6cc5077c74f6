-- Group commit's batch in one statement: the server sends one call per batch instead of
-- BEGIN, five statements and COMMIT, each a round trip to this server's backend. The rules
-- are those of `append_batch` in src/db/models/message.rs, one outcome per message, in order:
--   not_found   no such conversation;
--   repeat      the same client id earlier in this batch: the outcome of `first_ord`;
--   duplicate   the client id is already stored in the conversation: that row is returned;
--   not_active  the conversation's status (returned) is not 'active';
--   stored      stored as `seq`, the conversation's next (no gaps, in the batch's order).
-- The conversations' rows are locked first, by a statement of their own, so the rest reads
-- what was committed before the locks were granted (a message stored by another node while
-- this call waited is found as a duplicate, not refused by the unique index).
CREATE FUNCTION switchboard_append(
    p_session TEXT[],
    p_role TEXT[],
    p_author TEXT[],
    p_content TEXT[],
    p_client TEXT[],
    p_interrupted BOOLEAN[],
    p_model TEXT[],
    p_tokens INTEGER[],
    p_now TIMESTAMP
) RETURNS TABLE (
    ord INTEGER,
    outcome TEXT,
    seq BIGINT,
    status TEXT,
    first_ord INTEGER,
    id BIGINT,
    role TEXT,
    author_id TEXT,
    content TEXT,
    client_id TEXT,
    interrupted BOOLEAN,
    model TEXT,
    tokens INTEGER,
    created_at TIMESTAMP
)
-- Every lookup is by key, a few rows of large tables: index lookups in nested loops, whatever
-- the statistics say (on a new database they say the tables are empty, and the planner picks
-- scans of the whole tables that go on as they grow).
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
BEGIN
    PERFORM 1 FROM chat_sessions s WHERE s.id = ANY (p_session) ORDER BY s.id FOR UPDATE;
    RETURN QUERY
    WITH input AS (
        SELECT i.*
        FROM unnest(p_session, p_role, p_author, p_content, p_client, p_interrupted, p_model,
                    p_tokens) WITH ORDINALITY
            AS i (session_id, role, author_id, content, client_id, interrupted, model, tokens, ord)
    ),
    classified AS (
        SELECT i.*,
            s.status AS session_status,
            s.last_seq,
            d.id AS stored_id,
            min(i.ord) OVER (PARTITION BY i.session_id, i.client_id) AS first
        FROM input i
        LEFT JOIN chat_sessions s ON s.id = i.session_id
        LEFT JOIN chat_messages d ON d.session_id = i.session_id AND d.client_id = i.client_id
    ),
    decided AS (
        SELECT c.*,
            CASE
                WHEN c.session_status IS NULL THEN 'not_found'
                WHEN c.client_id IS NOT NULL AND c.first < c.ord THEN 'repeat'
                WHEN c.stored_id IS NOT NULL THEN 'duplicate'
                WHEN c.session_status <> 'active' THEN 'not_active'
                ELSE 'stored'
            END AS decision
        FROM classified c
    ),
    -- A stored message's seq: its conversation's last, plus the messages of the batch stored
    -- in it so far. (Computed over every row, not joined back: with joins by nested loop only,
    -- a join of two of these lists costs the square of the batch.)
    numbered AS (
        SELECT d.*,
            CASE WHEN d.decision = 'stored' THEN
                d.last_seq + count(*) FILTER (WHERE d.decision = 'stored')
                    OVER (PARTITION BY d.session_id ORDER BY d.ord)
            END AS new_seq
        FROM decided d
    ),
    inserted AS (
        INSERT INTO chat_messages
            (session_id, seq, role, author_id, content, client_id, interrupted, model, tokens, created_at)
        SELECT n.session_id, n.new_seq, n.role, n.author_id, n.content, n.client_id, n.interrupted,
            n.model, n.tokens, p_now
        FROM numbered n
        WHERE n.decision = 'stored'
        ORDER BY n.ord
        RETURNING 1
    ),
    advanced AS (
        UPDATE chat_sessions s SET last_seq = m.last, updated_at = p_now
        FROM (
            SELECT n.session_id, max(n.new_seq) AS last
            FROM numbered n
            WHERE n.decision = 'stored'
            GROUP BY n.session_id
        ) m
        WHERE s.id = m.session_id
        RETURNING 1
    )
    SELECT n.ord::INTEGER, n.decision, coalesce(n.new_seq, m.seq), n.session_status,
        n.first::INTEGER, m.id, m.role, m.author_id, m.content, m.client_id, m.interrupted,
        m.model, m.tokens, m.created_at
    FROM numbered n
    LEFT JOIN chat_messages m ON m.id = n.stored_id AND n.decision = 'duplicate'
    ORDER BY n.ord;
END;
$$;
