//! The web pages over plain HTTP: what is served, with which headers.

use reqwest::header;

use crate::helpers::{assert_error, spawn_app};

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[tokio::test]
async fn the_pages_and_their_files_are_served_with_strict_headers() {
    let app = spawn_app().await;
    for (path, content_type, marker) in [
        ("/", "text/html; charset=utf-8", "/static/widget.js"),
        ("/chat", "text/html; charset=utf-8", "/static/widget.js"),
        ("/admin", "text/html; charset=utf-8", "/static/dashboard.js"),
        (
            "/static/common.js",
            "text/javascript; charset=utf-8",
            "textContent",
        ),
        (
            "/static/widget.js",
            "text/javascript; charset=utf-8",
            "resume",
        ),
        (
            "/static/dashboard.js",
            "text/javascript; charset=utf-8",
            "takeover",
        ),
        ("/static/style.css", "text/css; charset=utf-8", ".msg"),
        ("/static/favicon.svg", "image/svg+xml", "<svg"),
        ("/favicon.ico", "image/svg+xml", "<svg"),
    ] {
        let res = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let headers = res.headers().clone();
        assert_eq!(headers[header::CONTENT_TYPE], content_type, "{path}");
        assert_eq!(headers[header::CONTENT_SECURITY_POLICY], CSP, "{path}");
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
        assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY", "{path}");
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache", "{path}");
        let body = res.text().await.unwrap();
        assert!(body.contains(marker), "{path} does not mention {marker}");

        // A browser revalidating an unchanged file gets 304 and no body.
        let etag = headers[header::ETAG].to_str().unwrap().to_string();
        let res = app
            .client
            .get(app.url(path))
            .header(header::IF_NONE_MATCH, &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 304, "{path}");
        assert_eq!(res.headers()[header::ETAG], etag.as_str());
        assert!(res.text().await.unwrap().is_empty());
        let res = app
            .client
            .get(app.url(path))
            .header(header::IF_NONE_MATCH, "\"something-else\"")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn only_the_embedded_files_are_served() {
    let app = spawn_app().await;
    for path in [
        "/static/nothing.js",
        "/static/widget.html",
        "/static/..%2FCargo.toml",
        "/static/%2e%2e/%2e%2e/Cargo.toml",
        "/static/",
        "/admin/../Cargo.toml",
        "/widget.js",
    ] {
        let res = app.client.get(app.url(path)).send().await.unwrap();
        assert_error(res, 404, "not_found").await;
    }
    let res = app.client.post(app.url("/chat")).send().await.unwrap();
    assert!(
        matches!(res.status().as_u16(), 404 | 405),
        "POST /chat answered {}",
        res.status()
    );
}
