//! Sign-in, token refresh and guest identities.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use crate::auth::{bearer_token, password, TokenKind, TokenPair};
use crate::db::models::token::{self, Consumed};
use crate::db::models::{user, User};
use crate::error::ApiError;
use crate::startup::AppState;

const MAX_EMAIL_LEN: usize = 254;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/auth/login").post(login))
        .service(web::resource("/auth/refresh").post(refresh))
        .service(web::resource("/auth/guest").post(guest));
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    email: String,
    password: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshRequest {
    refresh_token: String,
}

/// The public view of a user.
#[derive(Serialize)]
pub struct UserView {
    pub id: String,
    pub email: String,
    pub role: &'static str,
    pub is_active: bool,
    pub is_guest: bool,
}

impl From<&User> for UserView {
    fn from(u: &User) -> Self {
        UserView {
            id: u.id.clone(),
            email: u.email.clone(),
            role: u.role().as_str(),
            is_active: u.is_active,
            is_guest: u.is_guest,
        }
    }
}

#[derive(Serialize)]
struct SignedIn {
    #[serde(flatten)]
    tokens: TokenPair,
    user: UserView,
}

async fn login(
    state: web::Data<AppState>,
    body: web::Json<LoginRequest>,
) -> Result<HttpResponse, ApiError> {
    let LoginRequest { email, password } = body.into_inner();
    let email = email.trim().to_lowercase();
    // No stored email holds NUL, and PostgreSQL refuses it in a query: a plain wrong sign-in.
    if email.is_empty()
        || email.len() > MAX_EMAIL_LEN
        || email.contains('\0')
        || password.len() > password::MAX_LEN
    {
        return Err(ApiError::InvalidCredentials);
    }
    let found = state
        .db
        .run(move |c| Ok(user::find_by_email(c, &email)?))
        .await?;
    // argon2 takes tens of milliseconds of CPU: keep it off the async workers.
    let (ok, found) = web::block(move || {
        let ok = password::verify(
            &password,
            found.as_ref().and_then(|u| u.password_hash.as_deref()),
        );
        (ok, found)
    })
    .await
    .map_err(ApiError::internal)?;
    let user = match found {
        Some(u) if ok => u,
        _ => return Err(ApiError::InvalidCredentials),
    };
    if !user.is_active {
        return Err(ApiError::AccountDisabled);
    }
    log::info!("user {} signed in", user.id);
    Ok(HttpResponse::Ok().json(sign_in(&state, &user, None).await?))
}

/// The refresh token comes in the body, `{"refresh_token": "…"}`, or, with no body, as
/// `Authorization: Bearer <refresh token>` (how the admin dashboard of the first system sent it).
async fn refresh(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let token = match super::optional_json::<RefreshRequest>(&req, &body)? {
        Some(body) => body.refresh_token,
        None => bearer_token(&req, false).ok_or(ApiError::Unauthorized(
            "send {\"refresh_token\": \"…\"} or Authorization: Bearer <refresh token>",
        ))?,
    };
    let claims = state.jwt.verify(&token, TokenKind::Refresh)?;
    let jti = claims.jti.clone();
    let outcome = state.db.run(move |c| Ok(token::consume(c, &jti)?)).await?;
    let user_id = match outcome {
        Consumed::Rotated { user_id, family_id } if Some(&family_id) == claims.fam.as_ref() => {
            user_id
        }
        Consumed::Rotated { .. } | Consumed::Unknown => {
            return Err(ApiError::Unauthorized("the refresh token is not valid"))
        }
        Consumed::Expired => return Err(ApiError::TokenExpired),
        Consumed::Reused => {
            log::warn!(
                "refresh token {} was presented twice; its family is revoked",
                claims.jti
            );
            return Err(ApiError::Unauthorized(
                "this refresh token was already used; sign in again",
            ));
        }
    };
    let user = state
        .db
        .run(move |c| Ok(user::find(c, &user_id)?))
        .await?
        .ok_or(ApiError::Unauthorized("the account no longer exists"))?;
    if !user.is_active {
        return Err(ApiError::AccountDisabled);
    }
    Ok(HttpResponse::Ok().json(sign_in(&state, &user, claims.fam).await?))
}

/// A new customer identity for the chat widget: no email or password, just tokens.
async fn guest(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let id = uuid::Uuid::new_v4().to_string();
    let now = crate::db::models::now();
    let user = state
        .db
        .run(move |c| {
            let email = format!("guest-{id}@guest.invalid");
            Ok(user::insert(
                c,
                &user::NewUser {
                    id: &id,
                    email: &email,
                    password_hash: None,
                    role: "customer",
                    is_active: true,
                    is_guest: true,
                    created_at: now,
                    updated_at: now,
                },
            )?)
        })
        .await?;
    Ok(super::created(&sign_in(&state, &user, None).await?))
}

/// Issues an access token and a stored refresh token (in `family`, or a new one).
async fn sign_in(
    state: &AppState,
    user: &User,
    family: Option<String>,
) -> Result<SignedIn, ApiError> {
    let (access_token, expires_in) = state.jwt.access_token(user)?;
    let refresh = state.jwt.refresh_token(user, family)?;
    let user_id = user.id.clone();
    let (id, family_id, expires_at) = (
        refresh.id.clone(),
        refresh.family_id.clone(),
        refresh.expires_at,
    );
    state
        .db
        .run(move |c| Ok(token::insert(c, &id, &user_id, &family_id, expires_at)?))
        .await?;
    Ok(SignedIn {
        tokens: TokenPair {
            access_token,
            refresh_token: refresh.token,
            token_type: "Bearer",
            expires_in,
        },
        user: user.into(),
    })
}
