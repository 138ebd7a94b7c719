//! `GET /openapi.json` against the router (issue 15): the document and the routes cannot
//! drift apart.
//!
//! - every route of the table is in the served document, and every documented operation is
//!   in the table;
//! - every documented operation is answered by a real handler on a running server (not by
//!   the JSON fallbacks "no such route" / "method not allowed");
//! - every other method on a documented path is answered 405 (the router serves nothing
//!   the document lacks on that path);
//! - no code adds a route outside the table (`src/api/routes.rs`).

mod common;

use std::collections::BTreeSet;

use common::TestServer;
use serde_json::Value;

const METHODS: &[&str] = &["GET", "PUT", "POST", "DELETE", "PATCH"];

/// `(METHOD, path)` of every operation of the document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method.to_lowercase()).is_some() {
                out.insert((method.to_string(), path.clone()));
            }
        }
    }
    out
}

/// A concrete URL for a templated path: every `{param}` becomes a plausible value.
fn concrete(base: &str, path: &str) -> String {
    let filled = path
        .replace("{queue}", "probe")
        .replace("{exchange}", "probe")
        .replace("{group}", "default")
        .replace("{id}", "0-0")
        .replace("{file}", "probe.js");
    format!("{base}{filled}")
}

/// True when the answer came from the router's fallbacks, not from a handler.
async fn is_fallback(response: reqwest::Response) -> bool {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().unwrap_or("");
    let message = body["error"]["message"].as_str().unwrap_or("");
    (status == 404 && code == "not_found" && message == "no such route")
        || (status == 405 && code == "method_not_allowed")
}

async fn fetch_document(base: &str) -> Value {
    let response = reqwest::get(format!("{base}/openapi.json")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    response.json().await.unwrap()
}

#[tokio::test]
async fn the_document_and_the_router_list_the_same_routes() {
    let server = TestServer::start().await;
    let doc = fetch_document(&server.http).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let in_doc = documented(&doc);
    let in_router: BTreeSet<(String, String)> =
        qit::api::routes::route_list().into_iter().collect();
    let missing: Vec<_> = in_router.difference(&in_doc).collect();
    let extra: Vec<_> = in_doc.difference(&in_router).collect();
    assert!(missing.is_empty(), "routed but not documented: {missing:?}");
    assert!(extra.is_empty(), "documented but not routed: {extra:?}");
    // The contract's routes are all there.
    for route in [
        ("POST", "/queues/{queue}"),
        ("GET", "/queues/{queue}/log"),
        ("PUT", "/queues/{queue}/groups/{group}/offset"),
        ("POST", "/exchanges/{exchange}/messages"),
        ("GET", "/openapi.json"),
        ("GET", "/"),
    ] {
        let key = (route.0.to_string(), route.1.to_string());
        assert!(in_doc.contains(&key), "{route:?} is not documented");
    }
    server.stop().await;
}

#[tokio::test]
async fn every_documented_operation_is_served_and_nothing_else_on_its_path() {
    let server = TestServer::start().await;
    let doc = fetch_document(&server.http).await;
    let client = common::http();
    let in_doc = documented(&doc);
    let paths: BTreeSet<&String> = in_doc.iter().map(|(_, p)| p).collect();
    for path in paths {
        let url = concrete(&server.http, path);
        for method in METHODS {
            let request = client.request(method.parse().unwrap(), &url);
            let response = request.send().await.unwrap();
            let served = !is_fallback(response).await;
            let listed = in_doc.contains(&(method.to_string(), path.clone()));
            assert_eq!(
                served, listed,
                "{method} {path}: served by a handler = {served}, documented = {listed}"
            );
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn every_operation_documents_its_responses_and_errors() {
    let server = TestServer::start().await;
    let doc = fetch_document(&server.http).await;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses
                    .keys()
                    .any(|s| s.starts_with('2') || s.starts_with('3')),
                "{method} {path} has no success response"
            );
            let error = &responses["404"]["content"]["application/json"]["schema"]["$ref"];
            assert_eq!(error, "#/components/schemas/ErrorBody", "{method} {path}");
        }
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "QueueInfo",
        "QueueSettings",
        "GroupInfo",
        "Message",
        "ErrorBody",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
    assert!(
        schemas["ErrorBody"].get("example").is_some()
            || schemas["ErrorBody"].get("examples").is_some()
    );
    server.stop().await;
}

/// Routes are added only through the table, so that [`qit::api::routes::route_list`] is the
/// router's whole list.
#[test]
fn no_route_is_added_outside_the_table() {
    let mut files = Vec::new();
    collect(std::path::Path::new("src"), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for needle in [
            ".route(",
            ".nest(",
            ".route_service(",
            ".nest_service(",
            "into_axum_router",
        ] {
            assert!(
                !text.contains(needle),
                "{} calls `{needle}`: add routes to the table in src/api/routes.rs",
                file.display()
            );
        }
    }
}

fn collect(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Regression (found checking the document's error shape): a path parameter that is not
/// UTF-8 was answered by axum's `text/plain` rejection; every error is the JSON shape.
#[tokio::test]
async fn extractor_rejections_answer_the_json_error_shape() {
    let server = TestServer::start().await;
    for path in [
        "/queues/%FF",
        "/queues/%FF/messages",
        "/ui/%FF",
        "/exchanges/%C3%28",
    ] {
        let response = reqwest::get(format!("{}{path}", server.http))
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{path}");
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "application/json",
            "{path}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "bad_request", "{path}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("UTF-8"),
            "{body}"
        );
    }
    // Text that is not an error stays text.
    let metrics = reqwest::get(format!("{}/metrics", server.http))
        .await
        .unwrap();
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    server.stop().await;
}
