use chrono::NaiveDateTime;
use diesel::prelude::*;

use crate::db::schema::refresh_tokens;
use crate::db::DbConnection;

/// What presenting a refresh token led to.
#[derive(Debug, PartialEq, Eq)]
pub enum Consumed {
    /// The token was live and is now spent; issue a new one in the same family.
    Rotated { user_id: String, family_id: String },
    /// The token was already spent or revoked: its whole family is now revoked.
    Reused,
    /// Past its expiry.
    Expired,
    /// Never issued here.
    Unknown,
}

pub fn insert(
    conn: &mut DbConnection,
    id: &str,
    user_id: &str,
    family_id: &str,
    expires_at: NaiveDateTime,
) -> QueryResult<()> {
    diesel::insert_into(refresh_tokens::table)
        .values((
            refresh_tokens::id.eq(id),
            refresh_tokens::user_id.eq(user_id),
            refresh_tokens::family_id.eq(family_id),
            refresh_tokens::expires_at.eq(expires_at),
            refresh_tokens::revoked.eq(false),
            refresh_tokens::created_at.eq(super::now()),
        ))
        .execute(conn)?;
    Ok(())
}

/// Spends a refresh token once. The first statement is the write, so that two concurrent
/// refreshes with the same token cannot both succeed on either backend.
pub fn consume(conn: &mut DbConnection, id: &str) -> QueryResult<Consumed> {
    conn.transaction(|conn| {
        let now = super::now();
        let spent = diesel::update(
            refresh_tokens::table
                .filter(refresh_tokens::id.eq(id))
                .filter(refresh_tokens::used_at.is_null())
                .filter(refresh_tokens::revoked.eq(false))
                .filter(refresh_tokens::expires_at.gt(now)),
        )
        .set(refresh_tokens::used_at.eq(now))
        .execute(conn)?;
        let row: Option<(String, String, NaiveDateTime)> = refresh_tokens::table
            .find(id)
            .select((
                refresh_tokens::user_id,
                refresh_tokens::family_id,
                refresh_tokens::expires_at,
            ))
            .first(conn)
            .optional()?;
        Ok(match (spent, row) {
            (1, Some((user_id, family_id, _))) => Consumed::Rotated { user_id, family_id },
            (_, None) => Consumed::Unknown,
            (_, Some((_, _, expires_at))) if expires_at <= now => Consumed::Expired,
            (_, Some((_, family_id, _))) => {
                diesel::update(
                    refresh_tokens::table.filter(refresh_tokens::family_id.eq(&family_id)),
                )
                .set(refresh_tokens::revoked.eq(true))
                .execute(conn)?;
                Consumed::Reused
            }
        })
    })
}
