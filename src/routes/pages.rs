//! The two web pages, built into the binary: the customer widget at `/` and `/chat`, the agent
//! desk at `/admin`, and their scripts and styles under `/static/`.
//!
//! Every answer carries a strict Content-Security-Policy: scripts only from this server's own
//! files (no inline script), sockets and fetches only back to it, no framing. Files are
//! revalidated on every load (`no-cache` with a strong ETag), so a new binary's pages are
//! picked up at once and an unchanged file costs a 304.

use std::sync::LazyLock;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const WIDGET: &str = "widget.html";
const DASHBOARD: &str = "dashboard.html";

const ASSETS: &[Asset] = &[
    Asset {
        name: WIDGET,
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../web/widget.html"),
    },
    Asset {
        name: DASHBOARD,
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../web/dashboard.html"),
    },
    Asset {
        name: "common.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../web/common.js"),
    },
    Asset {
        name: "widget.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../web/widget.js"),
    },
    Asset {
        name: "dashboard.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../web/dashboard.js"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../web/favicon.svg"),
    },
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../web/style.css"),
    },
];

/// One strong ETag per file, from its content.
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| {
            let digest = Sha256::digest(a.body);
            let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
            format!("\"{hex}\"")
        })
        .collect()
});

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(widget))
        .route("/chat", web::get().to(widget))
        .route("/admin", web::get().to(dashboard))
        .route("/static/{name}", web::get().to(file))
        .route("/favicon.ico", web::get().to(favicon));
}

async fn widget(req: HttpRequest) -> HttpResponse {
    serve(&req, WIDGET).unwrap_or_else(|| HttpResponse::InternalServerError().finish())
}

async fn dashboard(req: HttpRequest) -> HttpResponse {
    serve(&req, DASHBOARD).unwrap_or_else(|| HttpResponse::InternalServerError().finish())
}

/// Browsers ask for /favicon.ico whatever the page says.
async fn favicon(req: HttpRequest) -> HttpResponse {
    serve(&req, "favicon.svg").unwrap_or_else(|| HttpResponse::InternalServerError().finish())
}

async fn file(req: HttpRequest, name: web::Path<String>) -> Result<HttpResponse, ApiError> {
    // The pages themselves have their own paths; only scripts and styles live here.
    if name.ends_with(".html") {
        return Err(ApiError::NotFound("file"));
    }
    serve(&req, &name).ok_or(ApiError::NotFound("file"))
}

/// The file `name` with its headers, or a 304 when the browser's copy is current.
fn serve(req: &HttpRequest, name: &str) -> Option<HttpResponse> {
    let index = ASSETS.iter().position(|a| a.name == name)?;
    let asset = &ASSETS[index];
    let etag = &ETAGS[index];
    let fresh = req
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == etag || tag.trim() == "*");
    let mut res = if fresh {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    res.insert_header((header::ETAG, etag.as_str()))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"));
    if fresh {
        return Some(res.finish());
    }
    Some(
        res.insert_header((header::CONTENT_TYPE, asset.content_type))
            .body(asset.body),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_names_only_files_that_are_served() {
        for page in [WIDGET, DASHBOARD] {
            let asset = ASSETS.iter().find(|a| a.name == page).unwrap();
            let html = std::str::from_utf8(asset.body).unwrap();
            for reference in html.split("/static/").skip(1) {
                let name = reference.split('"').next().unwrap();
                assert!(
                    ASSETS.iter().any(|a| a.name == name),
                    "{page} refers to /static/{name}, which is not embedded"
                );
            }
            // The policy forbids inline script; a page that had some would break.
            assert!(!html.contains("<script>"), "{page} has an inline script");
            let lower = html.to_ascii_lowercase();
            for (at, _) in lower.match_indices(" on") {
                let name: String = lower[at + 3..]
                    .chars()
                    .take_while(char::is_ascii_alphabetic)
                    .collect();
                assert!(
                    !lower[at + 3 + name.len()..].starts_with('='),
                    "{page} has an inline handler on{name}="
                );
            }
        }
    }
}
