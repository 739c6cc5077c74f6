//! The signed-in user's own record.

use actix_web::{web, HttpResponse};

use super::auth::UserView;
use crate::auth::{AuthUser, Staff};
use crate::db::models::user;
use crate::error::ApiError;
use crate::startup::AppState;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/users/me").get(me))
        .service(web::resource("/admin/users/me").get(admin_me));
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
