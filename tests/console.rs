//! The web console in a real, headless Chromium driven over WebDriver (issue 15): load the
//! overview, see a queue appear after it is created through the API, open it, browse a
//! message, publish one, redrive a dead letter, and log in under `--auth`; the cluster page
//! of a three-node cluster shows a killed node down and fenced.
//!
//! Chromium and chromedriver are Debian packages; when they are missing the test runs
//! `tools/browser.sh` to install them and fails loudly if that does not work (it never
//! passes without a browser). Every wait is on a condition with a generous deadline.
//! With `QIT_SCREENSHOTS=1` it saves the main pages as `docs/console-*.png`.

mod common;

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestServer, free_port, http};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// How long any one condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);
/// Bounds the whole test (a hung browser must not hang CI).
const WHOLE_TEST: Duration = Duration::from_secs(240);

/// A chromedriver process, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn has(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// chromedriver on a free port, once it accepts connections. Installs the browser first when
/// it is missing; panics when it cannot.
fn start_driver() -> Driver {
    if !has("chromium") || !has("chromedriver") {
        let status = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/browser.sh"))
            .status()
            .expect("run tools/browser.sh");
        assert!(
            status.success(),
            "chromium + chromedriver are required; tools/browser.sh failed"
        );
    }
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < DEADLINE, "chromedriver did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    driver
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1440,900", "--force-device-scale-factor=1"]
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session")
}

/// Waits until `check` returns `Some`, polling; fails with `what` after [`DEADLINE`].
async fn until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the element and returns it.
async fn element(c: &Client, css: &str) -> fantoccini::elements::Element {
    c.wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no element `{css}`: {e}"))
}

/// Waits until the text of the element at `css` contains `text`.
async fn text_contains(c: &Client, css: &str, text: &str) -> String {
    until(&format!("`{text}` in `{css}`"), || async {
        let el = c.find(Locator::Css(css)).await.ok()?;
        let now = el.text().await.ok()?;
        now.contains(text).then_some(now)
    })
    .await
}

async fn screenshot(c: &Client, name: &str) {
    if std::env::var_os("QIT_SCREENSHOTS").is_none() {
        return;
    }
    let png = c.screenshot().await.expect("screenshot");
    let path = format!("{}/docs/console-{name}.png", env!("CARGO_MANIFEST_DIR"));
    std::fs::write(&path, png).expect("write screenshot");
}

async fn post(url: String, body: Value) -> Value {
    let response = http().post(url).json(&body).send().await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    response.json().await.unwrap_or(Value::Null)
}

async fn publish_json(base: &str, queue: &str, body: Value) {
    post(format!("{base}/queues/{queue}/messages"), body).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    tokio::time::timeout(WHOLE_TEST, async {
        let driver = start_driver();
        let server = TestServer::start().await;
        let c = browser(&driver).await;
        overview_sees_a_new_queue(&c, &server.http).await;
        browse_and_publish(&c, &server.http).await;
        redrive_a_dead_letter(&c, &server.http).await;
        exchanges_page(&c, &server.http).await;
        cluster_page_on_a_single_node(&c, &server.http).await;
        dark_theme(&c, &server.http).await;
        c.close().await.unwrap();
        server.stop().await;
    })
    .await
    .expect("the browser test took too long");
}

/// The cluster page of a three-node cluster lists the nodes, all up; a node killed -9 shows
/// as down, then fenced once the metadata leader fenced it (the page refreshes itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_page_shows_a_killed_node_down_and_fenced() {
    tokio::time::timeout(WHOLE_TEST, async {
        let driver = start_driver();
        let mut cluster = common::cluster::Cluster::start().await;
        let c = browser(&driver).await;
        let base = cluster.node(1).http.clone();
        c.goto(&format!("{base}/ui/#/cluster")).await.unwrap();
        let nodes = "[data-test=cluster-nodes]";
        until("three nodes up", || async {
            let text = c.find(Locator::Css(nodes)).await.ok()?.text().await.ok()?;
            (text.matches(" up").count() == 3 && text.contains("metadata leader")).then_some(())
        })
        .await;
        cluster.kill(3);
        text_contains(&c, nodes, "down, fenced").await;
        c.close().await.unwrap();
    })
    .await
    .expect("the browser test took too long");
}

async fn overview_sees_a_new_queue(c: &Client, base: &str) {
    c.goto(&format!("{base}/")).await.unwrap();
    element(c, "[data-test=queue-table]").await;
    assert!(c.current_url().await.unwrap().path().starts_with("/ui/"));
    text_contains(c, "[data-test=queue-rows]", "No queues yet").await;
    post(format!("{base}/queues/orders"), json!({"partitions": 1})).await;
    for n in 0..3 {
        let body = json!({"order": n, "to": "user@example.com", "subject": "Hello!"});
        publish_json(base, "orders", body).await;
    }
    post(format!("{base}/queues/payments"), json!({})).await;
    // The overview polls the API: the new queue shows up without a reload.
    element(c, "tr[data-queue=orders]").await;
    text_contains(c, "tr[data-queue=orders]", "3").await;
    // Filtering hides the others.
    element(c, "[data-test=queue-filter]")
        .await
        .send_keys("pay")
        .await
        .unwrap();
    until("the filter to hide orders", || async {
        c.find(Locator::Css("tr[data-queue=orders]"))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    element(c, "[data-test=queue-filter]")
        .await
        .clear()
        .await
        .unwrap();
    element(c, "tr[data-queue=orders]").await;
    screenshot(c, "overview").await;
}

async fn browse_and_publish(c: &Client, base: &str) {
    element(c, "tr[data-queue=orders] a")
        .await
        .click()
        .await
        .unwrap();
    text_contains(c, "[data-test=queue-title]", "orders").await;
    element(c, "button[data-tab=messages]")
        .await
        .click()
        .await
        .unwrap();
    // Newest first: 0-2 is the first message shown.
    let first = element(c, "[data-test=messages] [data-test=message]").await;
    assert_eq!(first.attr("data-id").await.unwrap().as_deref(), Some("0-2"));
    element(c, "[data-test=messages] [data-id='0-2'] .msg-head")
        .await
        .click()
        .await
        .unwrap();
    // The JSON body is pretty-printed.
    let body = text_contains(c, "[data-id='0-2'] [data-test=msg-body]", "\"order\": 2").await;
    assert!(body.contains("\n  \"subject\": \"Hello!\""), "{body}");
    screenshot(c, "queue").await;

    element(c, "button[data-tab=publish]")
        .await
        .click()
        .await
        .unwrap();
    let input = element(c, "[data-test=publish-body]").await;
    input.clear().await.unwrap();
    input.send_keys(r#"{"from": "the console"}"#).await.unwrap();
    element(c, "[data-test=publish]")
        .await
        .click()
        .await
        .unwrap();
    text_contains(c, "[data-test=publish-result]", "Published 0-3").await;
    let log: Value = common::get_json(format!("{base}/queues/orders/log?from=3")).await;
    assert_eq!(log["messages"][0]["body"], json!({"from": "the console"}));
    assert_eq!(log["messages"][0]["content_type"], "application/json");

    // Seek the default group past everything: its backlog empties.
    element(c, "button[data-tab=groups]")
        .await
        .click()
        .await
        .unwrap();
    text_contains(c, "[data-test=groups]", "0: 0").await;
    let to = element(c, "[data-test=seek-to]").await;
    to.select_by_value("latest").await.unwrap();
    element(c, "[data-test=seek]").await.click().await.unwrap();
    text_contains(c, "[data-test=groups]", "0: 4").await;
    let group = common::get_json(format!("{base}/queues/orders/groups/default")).await;
    assert_eq!(group["backlog"], 0, "{group}");

    // Delete a group (after a confirmation): it leaves the table and the queue.
    let leased = common::get_json(format!("{base}/queues/orders/messages?group=audit")).await;
    let id = leased["messages"][0]["id"].as_str().unwrap().to_string();
    let acked = common::http()
        .delete(format!("{base}/queues/orders/messages/{id}?group=audit"))
        .send()
        .await
        .unwrap();
    assert_eq!(acked.status(), 204);
    c.refresh().await.unwrap();
    element(c, "button[data-tab=groups]")
        .await
        .click()
        .await
        .unwrap();
    element(c, "[data-test=delete-group][data-group=audit]")
        .await
        .click()
        .await
        .unwrap();
    c.accept_alert().await.unwrap();
    until("the deleted group leaves the table", || async {
        let rows = element(c, "[data-test=groups]").await.text().await.ok()?;
        (!rows.contains("audit") && rows.contains("default")).then_some(())
    })
    .await;
    let gone = common::http()
        .get(format!("{base}/queues/orders/groups/audit"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
}

async fn redrive_a_dead_letter(c: &Client, base: &str) {
    post(format!("{base}/queues/jobs"), json!({"max_deliveries": 1})).await;
    publish_json(base, "jobs", json!({"job": "resize", "id": 7})).await;
    let got = common::get_json(format!("{base}/queues/jobs/messages")).await;
    let id = got["messages"][0]["id"].as_str().unwrap().to_string();
    let nack = http()
        .post(format!("{base}/queues/jobs/messages/{id}/nack"))
        .send()
        .await
        .unwrap();
    assert_eq!(nack.status(), 204);
    c.goto(&format!("{base}/ui/#/queues/jobs")).await.unwrap();
    text_contains(c, "[data-test=queue-title]", "jobs").await;
    element(c, "button[data-tab=dlq]")
        .await
        .click()
        .await
        .unwrap();
    element(c, "[data-test=dlq-messages] [data-test=message]").await;
    screenshot(c, "dead-letters").await;
    element(c, "[data-test=redrive]")
        .await
        .click()
        .await
        .unwrap();
    text_contains(c, "#toasts", "Moved 1 message back to jobs").await;
    let jobs = common::get_json(format!("{base}/queues/jobs")).await;
    assert_eq!(jobs["partitions"][0]["next_offset"], 2, "{jobs}");
    assert_eq!(jobs["groups"][0]["backlog"], 1, "{jobs}");
    let dlq = common::get_json(format!("{base}/queues/jobs.dlq")).await;
    assert_eq!(dlq["groups"][0]["backlog"], 0, "{dlq}");
}

async fn exchanges_page(c: &Client, base: &str) {
    post(format!("{base}/exchanges/events"), json!({"type": "topic"})).await;
    post(
        format!("{base}/exchanges/events/bindings"),
        json!({"queue": "orders", "key": "orders.*"}),
    )
    .await;
    c.goto(&format!("{base}/ui/#/exchanges")).await.unwrap();
    text_contains(c, "[data-exchange=events]", "orders.*").await;
    screenshot(c, "exchanges").await;
    // Create one in the page: it exists through the API.
    element(c, "[data-test=create-exchange-name]")
        .await
        .send_keys("alerts")
        .await
        .unwrap();
    element(c, "[data-test=create-exchange]")
        .await
        .click()
        .await
        .unwrap();
    text_contains(c, "[data-exchange=alerts]", "direct").await;
    let alerts = common::get_json(format!("{base}/exchanges/alerts")).await;
    assert_eq!(alerts["type"], "direct", "{alerts}");
}

/// The theme toggle switches to dark and the choice survives a reload.
/// The cluster page on a node started without `--peers` says so instead of failing.
async fn cluster_page_on_a_single_node(c: &Client, base: &str) {
    c.goto(&format!("{base}/ui/#/cluster")).await.unwrap();
    text_contains(c, "[data-test=cluster]", "runs alone").await;
}

async fn dark_theme(c: &Client, base: &str) {
    c.goto(&format!("{base}/ui/")).await.unwrap();
    element(c, "tr[data-queue=orders]").await;
    let theme = "return document.documentElement.dataset.theme || null";
    let before = c.execute(theme, vec![]).await.unwrap();
    element(c, "#theme").await.click().await.unwrap();
    let after = c.execute(theme, vec![]).await.unwrap();
    assert_ne!(before, after);
    if after != json!("dark") {
        element(c, "#theme").await.click().await.unwrap();
    }
    c.refresh().await.unwrap();
    element(c, "tr[data-queue=orders]").await;
    assert_eq!(c.execute(theme, vec![]).await.unwrap(), json!("dark"));
    screenshot(c, "overview-dark").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_auth_the_console_starts_with_a_login_form() {
    tokio::time::timeout(WHOLE_TEST, async {
        let driver = start_driver();
        let temp = tempfile::tempdir().unwrap();
        let server = TestServer::start_with(temp.path(), |config| {
            config.auth = true;
            config.jwt_secret = Some("0123456789abcdef0123456789abcdef-console-test".into());
        })
        .await;
        let base = server.http.clone();
        post(
            format!("{base}/auth/register"),
            json!({"username": "alice", "password": "alice-password"}),
        )
        .await;
        let c = browser(&driver).await;
        c.goto(&format!("{base}/")).await.unwrap();
        element(&c, "[data-test=login-form]").await;
        screenshot(&c, "login").await;
        element(&c, "[data-test=login-user]")
            .await
            .send_keys("alice")
            .await
            .unwrap();
        element(&c, "[data-test=login-password]")
            .await
            .send_keys("wrong-password")
            .await
            .unwrap();
        element(&c, "[data-test=login-submit]")
            .await
            .click()
            .await
            .unwrap();
        text_contains(&c, "[data-test=login-error]", "Wrong user name or password").await;
        let password = element(&c, "[data-test=login-password]").await;
        password.clear().await.unwrap();
        password.send_keys("alice-password").await.unwrap();
        element(&c, "[data-test=login-submit]")
            .await
            .click()
            .await
            .unwrap();
        element(&c, "[data-test=queue-table]").await;
        text_contains(&c, "#user", "alice").await;
        let url = c.current_url().await.unwrap();
        assert!(!url.as_str().contains("eyJ"), "a token in the URL: {url}");
        // Signed in, the console acts as alice: a queue it creates is hers.
        element(&c, "[data-test=create-queue-name]")
            .await
            .send_keys("alices")
            .await
            .unwrap();
        element(&c, "[data-test=create-queue]")
            .await
            .click()
            .await
            .unwrap();
        element(&c, "tr[data-queue=alices]").await;
        // Another user granted `publish` on alice's queue sees it but is not offered what
        // he may not do.
        post(
            format!("{base}/auth/register"),
            json!({"username": "bob", "password": "bob-password"}),
        )
        .await;
        let login = post(
            format!("{base}/auth/login"),
            json!({"username": "alice", "password": "alice-password"}),
        )
        .await;
        let token = login["token"].as_str().expect("a token").to_string();
        let granted = http()
            .post(format!("{base}/queues/alices/grants"))
            .bearer_auth(token)
            .json(&json!({"user": "bob", "permissions": ["publish"]}))
            .send()
            .await
            .unwrap();
        assert!(granted.status().is_success(), "{}", granted.status());
        element(&c, "#logout").await.click().await.unwrap();
        element(&c, "[data-test=login-user]")
            .await
            .send_keys("bob")
            .await
            .unwrap();
        element(&c, "[data-test=login-password]")
            .await
            .send_keys("bob-password")
            .await
            .unwrap();
        element(&c, "[data-test=login-submit]")
            .await
            .click()
            .await
            .unwrap();
        text_contains(&c, "#user", "bob").await;
        c.goto(&format!("{base}/ui/#/queues/alices")).await.unwrap();
        text_contains(&c, "[data-test=queue-title]", "alices").await;
        element(&c, "button[data-tab=settings]").await;
        element(&c, "button[data-tab=publish]").await;
        for hidden in [
            "button[data-tab=messages]",
            "button[data-tab=dlq]",
            "[data-test=delete-queue]",
        ] {
            assert!(
                c.find(Locator::Css(hidden)).await.is_err(),
                "bob is offered {hidden}"
            );
        }
        c.close().await.unwrap();
        server.stop().await;
    })
    .await
    .expect("the browser test took too long");
}

/// The route the console asks before offering an action answers what the server enforces.
#[tokio::test]
async fn permissions_tell_what_the_caller_may_do() {
    let open = TestServer::start().await;
    post(format!("{}/queues/jobs", open.http), json!({})).await;
    let all = common::get_json(format!("{}/queues/jobs/permissions", open.http)).await;
    assert_eq!(
        all,
        json!({"user": null, "publish": true, "consume": true, "manage": true})
    );
    let missing = http()
        .get(format!("{}/queues/nope/permissions", open.http))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    open.stop().await;

    let temp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(temp.path(), |config| {
        config.auth = true;
        config.jwt_secret = Some("0123456789abcdef0123456789abcdef-console-test".into());
    })
    .await;
    let base = server.http.clone();
    let mut tokens = Vec::new();
    for user in ["alice", "bob"] {
        let credentials = json!({"username": user, "password": format!("{user}-password")});
        post(format!("{base}/auth/register"), credentials.clone()).await;
        let login = post(format!("{base}/auth/login"), credentials).await;
        tokens.push(login["token"].as_str().unwrap().to_string());
    }
    let as_user = |i: usize, method: reqwest::Method, path: &str| {
        http()
            .request(method, format!("{base}{path}"))
            .bearer_auth(&tokens[i])
    };
    let created = as_user(0, reqwest::Method::POST, "/queues/jobs")
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let grant = as_user(0, reqwest::Method::POST, "/queues/jobs/grants")
        .json(&json!({"user": "bob", "permissions": ["publish"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(grant.status(), 200);
    let of = |i: usize| {
        let request = as_user(i, reqwest::Method::GET, "/queues/jobs/permissions");
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    assert_eq!(
        of(0).await,
        json!({"user": "alice", "publish": true, "consume": true, "manage": true})
    );
    assert_eq!(
        of(1).await,
        json!({"user": "bob", "publish": true, "consume": false, "manage": false})
    );
    let anonymous = http()
        .get(format!("{base}/queues/jobs/permissions"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    // The console's files and the document need no token (they hold no data).
    for path in ["/ui/", "/ui/app.js", "/openapi.json"] {
        let r = http().get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    server.stop().await;
}
