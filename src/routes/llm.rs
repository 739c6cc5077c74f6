//! The AI side as operators and clients see it: which providers and models are configured,
//! whether they are healthy (their circuit breakers), which model answers now, and the AI
//! metrics per provider and model.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{AuthUser, Staff};
use crate::db::models::Role;
use crate::error::ApiError;
use crate::startup::AppState;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/llm/models").get(models))
        .service(web::resource("/llm/providers").get(providers))
        .service(web::resource("/llm/active-model").post(set_active_model));
}

pub fn admin_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/admin/chat/metrics/ai").get(metrics));
}

async fn models(state: web::Data<AppState>, _: AuthUser) -> HttpResponse {
    let ai = &state.ai;
    let active = ai.active_model();
    let primary = ai.primary();
    let mut list: Vec<_> = ai
        .models()
        .iter()
        .map(|id| {
            json!({
                "id": id,
                "provider": primary.name(),
                "active": *id == active,
                "fallback": false,
                "demo": primary.is_demo(),
            })
        })
        .collect();
    for guarded in ai.providers().iter().skip(1) {
        let p = &guarded.provider;
        list.push(json!({
            "id": p.model(),
            "provider": p.name(),
            "active": false,
            "fallback": true,
            "demo": p.is_demo(),
        }));
    }
    HttpResponse::Ok().json(json!({ "active_model": active, "models": list }))
}

async fn providers(state: web::Data<AppState>, _: AuthUser) -> HttpResponse {
    let list: Vec<_> = state
        .ai
        .providers()
        .iter()
        .enumerate()
        .map(|(i, guarded)| {
            let p = &guarded.provider;
            let breaker = guarded.breaker.state();
            let mut entry = json!({
                "name": p.name(),
                "model": p.model(),
                "role": if i == 0 { "primary" } else { "fallback" },
                "configured": true,
                "healthy": breaker == "closed",
                "breaker": breaker,
                "demo": p.is_demo(),
            });
            if p.is_demo() {
                entry["note"] = json!(
                    "the built-in demo model gives canned answers; set AI_PROVIDER=bedrock or openai for a real one"
                );
            }
            entry
        })
        .collect();
    HttpResponse::Ok().json(json!({ "providers": list }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActiveModel {
    model_id: String,
}

async fn set_active_model(
    state: web::Data<AppState>,
    caller: AuthUser,
    body: web::Json<ActiveModel>,
) -> Result<HttpResponse, ApiError> {
    if caller.role != Role::Admin {
        return Err(ApiError::Forbidden(
            "only an admin may change the active model",
        ));
    }
    let id = body.into_inner().model_id;
    if !state.ai.set_active_model(&id) {
        let known = state.ai.models().join(", ");
        let shown: String = id.chars().take(100).collect();
        return Err(ApiError::BadRequest(format!(
            "unknown model `{shown}`; the configured models are: {known}"
        )));
    }
    log::info!("{} switched the active model to {id}", caller.email);
    Ok(HttpResponse::Ok().json(json!({ "active_model": id })))
}

async fn metrics(state: web::Data<AppState>, _: Staff) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "models": state.ai.metrics().report() }))
}
