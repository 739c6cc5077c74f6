use chrono::NaiveDateTime;
use diesel::prelude::*;
use serde::Serialize;

use crate::db::schema::users;
use crate::db::DbConnection;

/// What a user may do. Stored as text in `users.role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Customer,
    Agent,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Agent => "agent",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "customer" => Some(Role::Customer),
            "agent" => Some(Role::Agent),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// Agents and admins work the dashboard and may see every conversation.
    pub fn is_staff(self) -> bool {
        matches!(self, Role::Agent | Role::Admin)
    }
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = users)]
pub struct User {
    pub id: String,
    pub email: String,
    pub password_hash: Option<String>,
    pub role: String,
    pub is_active: bool,
    pub is_guest: bool,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

impl User {
    /// The stored role; a value outside the three known ones is treated as the least privileged.
    pub fn role(&self) -> Role {
        Role::parse(&self.role).unwrap_or(Role::Customer)
    }
}

#[derive(Insertable)]
#[diesel(table_name = users)]
pub struct NewUser<'a> {
    pub id: &'a str,
    pub email: &'a str,
    pub password_hash: Option<&'a str>,
    pub role: &'a str,
    pub is_active: bool,
    pub is_guest: bool,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

pub fn find(conn: &mut DbConnection, id: &str) -> QueryResult<Option<User>> {
    users::table
        .find(id)
        .select(User::as_select())
        .first(conn)
        .optional()
}

pub fn find_by_email(conn: &mut DbConnection, email: &str) -> QueryResult<Option<User>> {
    users::table
        .filter(users::email.eq(email))
        .select(User::as_select())
        .first(conn)
        .optional()
}

pub fn insert(conn: &mut DbConnection, new: &NewUser<'_>) -> QueryResult<User> {
    diesel::insert_into(users::table)
        .values(new)
        .execute(conn)?;
    users::table
        .find(new.id)
        .select(User::as_select())
        .first(conn)
}

/// Changes role and/or active flag; returns the updated user, or `None` when no user has that email.
pub fn update(
    conn: &mut DbConnection,
    email: &str,
    role: Option<Role>,
    is_active: Option<bool>,
) -> QueryResult<Option<User>> {
    match find_by_email(conn, email)? {
        Some(user) => update_by_id(conn, &user.id, role, is_active),
        None => Ok(None),
    }
}

/// Changes role and/or active flag; returns the updated user, or `None` when no user has that id.
pub fn update_by_id(
    conn: &mut DbConnection,
    id: &str,
    role: Option<Role>,
    is_active: Option<bool>,
) -> QueryResult<Option<User>> {
    let now = super::now();
    let target = users::table.filter(users::id.eq(id));
    let n = match (role, is_active) {
        (Some(r), Some(a)) => diesel::update(target)
            .set((
                users::role.eq(r.as_str()),
                users::is_active.eq(a),
                users::updated_at.eq(now),
            ))
            .execute(conn)?,
        (Some(r), None) => diesel::update(target)
            .set((users::role.eq(r.as_str()), users::updated_at.eq(now)))
            .execute(conn)?,
        (None, Some(a)) => diesel::update(target)
            .set((users::is_active.eq(a), users::updated_at.eq(now)))
            .execute(conn)?,
        (None, None) => 0,
    };
    if n == 0 && (role.is_some() || is_active.is_some()) {
        return Ok(None);
    }
    find(conn, id)
}
