//! The schema, written once for both backends: only types that PostgreSQL and SQLite share
//! (`Text`, `BigInt`, `Integer`, `Bool`, `Timestamp`) so that one query serves both.
//! Timestamps are UTC.

diesel::table! {
    users (id) {
        id -> Text,
        email -> Text,
        password_hash -> Nullable<Text>,
        role -> Text,
        is_active -> Bool,
        is_guest -> Bool,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    refresh_tokens (id) {
        id -> Text,
        user_id -> Text,
        family_id -> Text,
        expires_at -> Timestamp,
        used_at -> Nullable<Timestamp>,
        revoked -> Bool,
        created_at -> Timestamp,
    }
}

diesel::table! {
    chat_sessions (id) {
        id -> Text,
        user_id -> Text,
        title -> Text,
        status -> Text,
        mode -> Text,
        assigned_agent_id -> Nullable<Text>,
        last_seq -> BigInt,
        created_at -> Timestamp,
        updated_at -> Timestamp,
        deleted_at -> Nullable<Timestamp>,
        human_requested_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    chat_messages (id) {
        id -> BigInt,
        session_id -> Text,
        seq -> BigInt,
        role -> Text,
        author_id -> Nullable<Text>,
        content -> Text,
        client_id -> Nullable<Text>,
        interrupted -> Bool,
        model -> Nullable<Text>,
        tokens -> Nullable<Integer>,
        created_at -> Timestamp,
    }
}

diesel::joinable!(chat_messages -> chat_sessions (session_id));
diesel::joinable!(chat_sessions -> users (user_id));
diesel::joinable!(refresh_tokens -> users (user_id));
diesel::allow_tables_to_appear_in_same_query!(users, refresh_tokens, chat_sessions, chat_messages);
