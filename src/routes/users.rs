//! Users: the signed-in user's own record, and an admin's changes to any account.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::auth::UserView;
use crate::actors::session_manager::messages::{Kick, KickAccount};
use crate::auth::{Admin, AuthUser, Staff};
use crate::db::models::{user, Role};
use crate::error::ApiError;
use crate::startup::AppState;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/users/me").get(me))
        .service(web::resource("/admin/users/me").get(admin_me))
        .service(web::resource("/admin/users/{id}").patch(change));
}

async fn me(state: web::Data<AppState>, caller: AuthUser) -> Result<HttpResponse, ApiError> {
    view(&state, caller).await
}

async fn admin_me(
    state: web::Data<AppState>,
    Staff(caller): Staff,
) -> Result<HttpResponse, ApiError> {
    view(&state, caller).await
}

async fn view(state: &AppState, caller: AuthUser) -> Result<HttpResponse, ApiError> {
    let id = caller.id;
    let user = state
        .db
        .run(move |c| Ok(user::find(c, &id)?))
        .await?
        .ok_or(ApiError::NotFound("user"))?;
    Ok(HttpResponse::Ok().json(UserView::from(&user)))
}

/// What an admin may change about an account; at least one field.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserChange {
    is_active: Option<bool>,
    role: Option<Role>,
}

/// Changes an account's role or locks it out. The account's live sockets on this node close at
/// once with the reason; other nodes close theirs at their next account check.
async fn change(
    state: web::Data<AppState>,
    Admin(caller): Admin,
    path: web::Path<String>,
    req: HttpRequest,
    // Parsed after the caller is known to be an admin: `web::Json` would judge the body first.
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    // Longer than any id this server makes, or holding NUL (which PostgreSQL refuses).
    if id.len() > 64 || id.contains('\0') {
        return Err(ApiError::NotFound("user"));
    }
    let change: Option<UserChange> = super::optional_json(&req, &body)?;
    let (is_active, role) = change.map_or((None, None), |c| (c.is_active, c.role));
    if is_active.is_none() && role.is_none() {
        return Err(ApiError::BadRequest(
            "say what to change: `is_active` and/or `role`".into(),
        ));
    }
    if id == caller.id && (is_active == Some(false) || role.is_some_and(|r| r != Role::Admin)) {
        return Err(ApiError::OwnAccount(
            "an admin cannot deactivate their own account or give up their own admin role; \
             ask another admin",
        ));
    }
    let changed = state
        .db
        .run(move |c| {
            let Some(before) = user::find(c, &id)? else {
                return Ok(Err(ApiError::NotFound("user")));
            };
            // A guest's token is handed to anyone who opens the chat widget.
            if before.is_guest && role.is_some_and(Role::is_staff) {
                return Ok(Err(ApiError::BadRequest(
                    "a guest account cannot be given a staff role".into(),
                )));
            }
            let after = user::update_by_id(c, &id, role, is_active)?;
            Ok(after
                .map(|after| (before, after))
                .ok_or(ApiError::NotFound("user")))
        })
        .await??;
    let (before, after) = changed;
    let kick = if !after.is_active {
        Some(("account_disabled", "the account was deactivated"))
    } else if after.role != before.role {
        Some(("role_changed", "the account's role changed; sign in again"))
    } else {
        None
    };
    log::info!(
        "{} changed {} ({}): role {} -> {}, active {} -> {}",
        caller.email,
        after.email,
        after.id,
        before.role,
        after.role,
        before.is_active,
        after.is_active
    );
    if let Some((code, message)) = kick {
        let kicked = state
            .manager
            .send(KickAccount {
                user_id: after.id.clone(),
                kick: Kick {
                    code,
                    message: message.into(),
                },
            })
            .await;
        if let Err(e) = kicked {
            // The account check closes them within `realtime.account_check_interval`.
            log::warn!("closing the sockets of {} failed: {e}", after.id);
        }
    }
    Ok(HttpResponse::Ok().json(UserView::from(&after)))
}
