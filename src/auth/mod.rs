//! Authentication: tokens, passwords, and the extractors that turn a request into a caller.
//!
//! Access and refresh tokens are JWTs signed with `JWT_SECRET`. The algorithm is pinned
//! (HS256 unless configured), and `exp`, `iss` and `aud` are required and checked. Every
//! authenticated request reloads the user, so a deactivated account or a changed role takes
//! effect at once.

pub mod password;

use std::future::Future;
use std::pin::Pin;

use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthSettings;
use crate::db::models::{user, Role, User};
use crate::error::ApiError;
use crate::startup::AppState;

/// What kind of token a JWT is; an access token is never accepted as a refresh token or back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    Access,
    Refresh,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub typ: TokenKind,
    pub iat: i64,
    pub exp: i64,
    pub iss: String,
    pub aud: String,
    pub jti: String,
    /// Refresh tokens: the sign-in this token descends from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fam: Option<String>,
}

/// A fresh pair of tokens, as returned by login, guest and refresh.
#[derive(Debug, Serialize)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: i64,
}

/// Keys and rules for signing and checking tokens.
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    algorithm: Algorithm,
    validation: Validation,
    access_ttl: chrono::Duration,
    refresh_ttl: chrono::Duration,
    issuer: String,
    audience: String,
}

/// A refresh token to store: its id, family and expiry go into `refresh_tokens`.
pub struct IssuedRefresh {
    pub token: String,
    pub id: String,
    pub family_id: String,
    pub expires_at: chrono::NaiveDateTime,
}

impl JwtKeys {
    pub fn new(settings: &AuthSettings) -> anyhow::Result<JwtKeys> {
        let algorithm = match settings.algorithm.as_str() {
            "HS256" => Algorithm::HS256,
            "HS384" => Algorithm::HS384,
            "HS512" => Algorithm::HS512,
            other => anyhow::bail!("unsupported JWT algorithm {other}"),
        };
        let secret = settings.jwt_secret.expose().as_bytes();
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[settings.issuer.as_str()]);
        validation.set_audience(&[settings.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 5;
        let ttl = |d: std::time::Duration| {
            chrono::Duration::from_std(d).unwrap_or_else(|_| chrono::Duration::days(1))
        };
        Ok(JwtKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            algorithm,
            validation,
            access_ttl: ttl(settings.jwt_expiry.get()),
            refresh_ttl: ttl(settings.refresh_expiry.get()),
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
        })
    }

    fn sign(&self, claims: &Claims) -> Result<String, ApiError> {
        encode(&Header::new(self.algorithm), claims, &self.encoding).map_err(ApiError::internal)
    }

    fn claims(
        &self,
        user: &User,
        typ: TokenKind,
        ttl: chrono::Duration,
        fam: Option<String>,
    ) -> Claims {
        let now = chrono::Utc::now();
        Claims {
            sub: user.id.clone(),
            role: user.role(),
            typ,
            iat: now.timestamp(),
            exp: (now + ttl).timestamp(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            jti: uuid::Uuid::new_v4().to_string(),
            fam,
        }
    }

    /// An access token for `user`, and its lifetime in seconds.
    pub fn access_token(&self, user: &User) -> Result<(String, i64), ApiError> {
        let claims = self.claims(user, TokenKind::Access, self.access_ttl, None);
        Ok((self.sign(&claims)?, self.access_ttl.num_seconds()))
    }

    /// A refresh token for `user` in `family` (a new family on sign-in).
    pub fn refresh_token(
        &self,
        user: &User,
        family: Option<String>,
    ) -> Result<IssuedRefresh, ApiError> {
        let family_id = family.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let claims = self.claims(
            user,
            TokenKind::Refresh,
            self.refresh_ttl,
            Some(family_id.clone()),
        );
        let expires_at = chrono::DateTime::from_timestamp(claims.exp, 0)
            .map(|t| t.naive_utc())
            .ok_or(ApiError::Internal)?;
        Ok(IssuedRefresh {
            token: self.sign(&claims)?,
            id: claims.jti,
            family_id,
            expires_at,
        })
    }

    /// Checks signature, algorithm, expiry, issuer, audience and kind.
    pub fn verify(&self, token: &str, kind: TokenKind) -> Result<Claims, ApiError> {
        use jsonwebtoken::errors::ErrorKind;
        let data =
            decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => ApiError::TokenExpired,
                    _ => ApiError::Unauthorized("the token is not valid"),
                }
            })?;
        if data.claims.typ != kind {
            return Err(ApiError::Unauthorized("wrong kind of token"));
        }
        Ok(data.claims)
    }
}

/// The signed-in caller of a request, reloaded from the database.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub id: String,
    pub email: String,
    pub role: Role,
    pub is_guest: bool,
}

impl AuthUser {
    pub fn is_staff(&self) -> bool {
        self.role.is_staff()
    }
}

/// Where a request's token was found.
pub fn bearer_token(req: &HttpRequest, allow_query: bool) -> Option<String> {
    if let Some(value) = req.headers().get(actix_web::http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string());
    }
    if allow_query {
        let query = web::Query::<TokenQuery>::from_query(req.query_string()).ok()?;
        return query.into_inner().token;
    }
    None
}

#[derive(Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

/// Turns an access token into the current user, refusing disabled accounts.
pub async fn authenticate(state: &AppState, token: &str) -> Result<AuthUser, ApiError> {
    let claims = state.jwt.verify(token, TokenKind::Access)?;
    let id = claims.sub;
    let user = state
        .db
        .run(move |c| Ok(user::find(c, &id)?))
        .await?
        .ok_or(ApiError::Unauthorized("the account no longer exists"))?;
    if !user.is_active {
        return Err(ApiError::AccountDisabled);
    }
    Ok(AuthUser {
        role: user.role(),
        id: user.id,
        email: user.email,
        is_guest: user.is_guest,
    })
}

impl FromRequest for AuthUser {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<AuthUser, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let token = bearer_token(req, false);
        Box::pin(async move {
            let state = state.ok_or(ApiError::Internal)?;
            let token = token.ok_or(ApiError::Unauthorized(
                "sign in first: send Authorization: Bearer <access token>",
            ))?;
            authenticate(&state, &token).await
        })
    }
}

/// An agent or an admin: anyone else gets 403.
#[derive(Debug, Clone)]
pub struct Staff(pub AuthUser);

impl FromRequest for Staff {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Staff, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let user = AuthUser::from_request(req, payload);
        Box::pin(async move {
            let user = user.await?;
            if !user.is_staff() {
                return Err(ApiError::Forbidden("this needs an agent or admin account"));
            }
            Ok(Staff(user))
        })
    }
}

/// An admin: agents and customers get 403.
#[derive(Debug, Clone)]
pub struct Admin(pub AuthUser);

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Admin, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let user = AuthUser::from_request(req, payload);
        Box::pin(async move {
            let user = user.await?;
            if user.role != Role::Admin {
                return Err(ApiError::Forbidden("this needs an admin account"));
            }
            Ok(Admin(user))
        })
    }
}
