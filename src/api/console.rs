//! The web console: static files under `ui/`, embedded in the binary at build time and
//! served at `/ui/`. The page talks to the public HTTP API only (everything it does can be
//! done with curl); with `--auth` it logs in through `/auth/login` and keeps the token in
//! `sessionStorage`, never in a URL.

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use super::error::ApiError;

/// One embedded file: name under `/ui/`, content type, bytes.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

/// Every file of the console. uPlot (MIT, 1.6.32, from npm) is vendored minified with its
/// licence.
const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        bytes: include_bytes!("../../ui/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../ui/app.js"),
    },
    Asset {
        name: "theme.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../ui/theme.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../../ui/app.css"),
    },
    Asset {
        name: "uplot.min.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../ui/uplot.min.js"),
    },
    Asset {
        name: "uplot.min.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../../ui/uplot.min.css"),
    },
    Asset {
        name: "uplot.LICENSE",
        content_type: "text/plain; charset=utf-8",
        bytes: include_bytes!("../../ui/uplot.LICENSE"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        bytes: include_bytes!("../../ui/favicon.svg"),
    },
];

/// The page may load only its own files and talk only to its own origin.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// `GET /`: a browser lands on the console.
#[utoipa::path(get, path = "/", tag = "console",
    description = "Redirects to the console at `/ui/`.",
    responses((status = 303, description = "To `/ui/`", headers(("location" = String))), super::schema::Errors))]
pub(super) async fn root() -> Redirect {
    Redirect::to("/ui/")
}

/// `GET /ui/`: the console's page.
#[utoipa::path(get, path = "/ui/", tag = "console",
    description = "The web console (HTML).",
    responses((status = 200, description = "The console page", content_type = "text/html", body = String), super::schema::Errors))]
pub(super) async fn index() -> Response {
    serve("index.html")
}

/// `GET /ui/{file}`: a script, style sheet or licence of the console.
#[utoipa::path(get, path = "/ui/{file}", tag = "console",
    description = "A static file of the console (scripts, styles, the vendored chart library and its licence).",
    params(("file" = String, Path, description = "File name", example = "app.js")),
    responses((status = 200, description = "The file", content((String = "text/javascript"), (String = "text/css"), (String = "text/plain"), (String = "image/svg+xml"), (String = "text/html"))), super::schema::Errors))]
pub(super) async fn asset(Path(file): Path<String>) -> Response {
    serve(&file)
}

/// The named asset with its headers, or the JSON 404.
fn serve(name: &str) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such console file")
            .into_response();
    };
    let mut response = asset.bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_served_and_unknown_ones_are_404() {
        for asset in ASSETS {
            assert_eq!(serve(asset.name).status(), StatusCode::OK, "{}", asset.name);
            assert!(!asset.bytes.is_empty(), "{}", asset.name);
        }
        assert_eq!(serve("../Cargo.toml").status(), StatusCode::NOT_FOUND);
    }
}
