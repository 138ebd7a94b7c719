//! Users and access over HTTP and gRPC: a roles x routes matrix, token tampering and
//! expiry, and a restart keeping users, owners and grants.

mod common;

use std::path::Path;

use common::{TestServer, http};
use qit::proto::broker_client::BrokerClient;
use qit::proto::{self};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tonic::Code;
use tonic::metadata::MetadataValue;

const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

async fn start(dir: &Path) -> TestServer {
    TestServer::start_with(dir, |c| {
        c.auth = true;
        c.jwt_secret = Some(SECRET.into());
        c.admin = Some("admin".into());
        c.admin_password = Some("admin-password".into());
    })
    .await
}

async fn register(s: &TestServer, user: &str) -> String {
    let r = http()
        .post(format!("{}/auth/register", s.http))
        .json(&json!({"username": user, "password": format!("{user}-password")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    login(s, user, &format!("{user}-password")).await
}

async fn login(s: &TestServer, user: &str, password: &str) -> String {
    let r: Value = http()
        .post(format!("{}/auth/login", s.http))
        .json(&json!({"username": user, "password": password}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["token"].as_str().unwrap().to_string()
}

async fn call(
    s: &TestServer,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> StatusCode {
    let mut r = http().request(method, format!("{}{path}", s.http));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    r.send().await.unwrap().status()
}

#[tokio::test]
async fn roles_by_routes_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let alice = register(&s, "alice").await;
    let bob = register(&s, "bob").await;
    let admin = login(&s, "admin", "admin-password").await;
    assert_eq!(
        call(&s, None, Method::GET, "/healthz", None).await,
        StatusCode::OK
    );
    assert_eq!(
        call(&s, None, Method::GET, "/queues", None).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&s, Some("garbage"), Method::GET, "/queues", None).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&s, Some(&alice), Method::POST, "/queues/jobs", None).await,
        StatusCode::CREATED
    );
    // (route, alice = owner, bob = stranger)
    let matrix: Vec<(Method, &str, Option<Value>, StatusCode, StatusCode)> = vec![
        (
            Method::GET,
            "/queues/jobs",
            None,
            StatusCode::OK,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::POST,
            "/queues/jobs/messages",
            Some(json!({"n": 1})),
            StatusCode::CREATED,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::POST,
            "/queues/jobs/messages/batch",
            Some(json!({"messages": [{"body": 1}]})),
            StatusCode::CREATED,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::GET,
            "/queues/jobs/messages",
            None,
            StatusCode::OK,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::GET,
            "/queues/jobs/log",
            None,
            StatusCode::OK,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::GET,
            "/queues/jobs/groups/default",
            None,
            StatusCode::OK,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::POST,
            "/queues/jobs/redrive",
            None,
            StatusCode::OK,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::POST,
            "/queues/jobs/grants",
            Some(json!({"user": "bob", "permissions": []})),
            StatusCode::OK,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::DELETE,
            "/queues/jobs.dlq",
            None,
            StatusCode::NO_CONTENT,
            StatusCode::FORBIDDEN,
        ),
    ];
    for (i, (method, path, body, owner, stranger)) in matrix.into_iter().enumerate() {
        assert_eq!(
            call(&s, Some(&bob), method.clone(), path, body.clone()).await,
            stranger,
            "bob, row {i}"
        );
        assert_eq!(
            call(&s, Some(&alice), method, path, body).await,
            owner,
            "alice, row {i}"
        );
    }
    // Grants let bob publish, then consume.
    let grant = json!({"user": "bob", "permissions": ["publish"]});
    assert_eq!(
        call(
            &s,
            Some(&alice),
            Method::POST,
            "/queues/jobs/grants",
            Some(grant)
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        call(
            &s,
            Some(&bob),
            Method::POST,
            "/queues/jobs/messages",
            Some(json!(1))
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(
        call(&s, Some(&bob), Method::GET, "/queues/jobs/messages", None).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&s, Some(&bob), Method::DELETE, "/queues/jobs", None).await,
        StatusCode::FORBIDDEN
    );
    // Exchanges: bob owns his, but may not bind alice's queue without publish rights on it.
    assert_eq!(
        call(
            &s,
            Some(&bob),
            Method::POST,
            "/exchanges/bx",
            Some(json!({"type": "fanout"}))
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(
        call(&s, Some(&alice), Method::POST, "/queues/private", None).await,
        StatusCode::CREATED
    );
    let bind = json!({"queue": "private"});
    assert_eq!(
        call(
            &s,
            Some(&bob),
            Method::POST,
            "/exchanges/bx/bindings",
            Some(bind.clone())
        )
        .await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(
            &s,
            Some(&alice),
            Method::POST,
            "/exchanges/bx/bindings",
            Some(bind)
        )
        .await,
        StatusCode::FORBIDDEN
    );
    // Only the owner deletes an exchange; anyone signed in may look at it.
    assert_eq!(
        call(&s, Some(&alice), Method::GET, "/exchanges/bx", None).await,
        StatusCode::OK
    );
    assert_eq!(
        call(&s, Some(&alice), Method::DELETE, "/exchanges/bx", None).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&s, Some(&bob), Method::DELETE, "/exchanges/bx", None).await,
        StatusCode::NO_CONTENT
    );
    // A deleted exchange's name is free again, for a new owner.
    assert_eq!(
        call(
            &s,
            Some(&alice),
            Method::POST,
            "/exchanges/bx",
            Some(json!({"type": "direct"}))
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(
        call(&s, Some(&bob), Method::DELETE, "/exchanges/bx", None).await,
        StatusCode::FORBIDDEN
    );
    // The admin may do everything.
    assert_eq!(
        call(&s, Some(&admin), Method::DELETE, "/queues/jobs", None).await,
        StatusCode::NO_CONTENT
    );
    s.stop().await;
}

#[tokio::test]
async fn tampered_expired_and_wrong_credentials_get_401() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let token = register(&s, "carol").await;
    let r = http()
        .post(format!("{}/auth/login", s.http))
        .json(&json!({"username": "carol", "password": "wrong-password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let mut parts: Vec<String> = token.split('.').map(String::from).collect();
    parts[1] = parts[1].chars().rev().collect();
    assert_eq!(
        call(&s, Some(&parts.join(".")), Method::GET, "/queues", None).await,
        StatusCode::UNAUTHORIZED
    );
    let mut sig = token.clone();
    let last = sig.pop().unwrap();
    sig.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(
        call(&s, Some(&sig), Method::GET, "/queues", None).await,
        StatusCode::UNAUTHORIZED
    );
    // A token signed with the right secret but already expired.
    let expired = {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let claims = json!({"sub": "carol", "exp": 1_000_000_000u64, "iat": 999_999_000u64});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    assert_eq!(
        call(&s, Some(&expired), Method::GET, "/queues", None).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&s, Some(&token), Method::GET, "/queues", None).await,
        StatusCode::OK
    );
    s.stop().await;
}

fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

#[tokio::test]
async fn grpc_needs_tokens_and_grants_and_a_restart_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = {
        let s = start(dir.path()).await;
        let alice = register(&s, "alice").await;
        let bob = register(&s, "bob").await;
        let mut c = BrokerClient::connect(s.grpc.clone()).await.unwrap();
        let create = proto::CreateQueueRequest {
            queue: "g".into(),
            settings: None,
        };
        let denied = c.create_queue(create.clone()).await.unwrap_err();
        assert_eq!(denied.code(), Code::Unauthenticated);
        c.create_queue(authed(create, &alice)).await.unwrap();
        let send = proto::SendMessageRequest {
            queue: "g".into(),
            messages: vec![proto::OutgoingMessage {
                body: bytes::Bytes::from_static(b"x"),
                ..Default::default()
            }],
        };
        let forbidden = c
            .send_message(authed(send.clone(), &bob))
            .await
            .unwrap_err();
        assert_eq!(forbidden.code(), Code::PermissionDenied);
        c.send_message(authed(send, &alice)).await.unwrap();
        // The group calls need consume on the queue, as over HTTP.
        let get = proto::GetGroupRequest {
            queue: "g".into(),
            group: String::new(),
        };
        let seek = proto::SeekGroupRequest {
            queue: "g".into(),
            group: String::new(),
            target: Some(proto::seek_group_request::Target::To("latest".into())),
        };
        let delete = proto::DeleteGroupRequest {
            queue: "g".into(),
            group: String::new(),
        };
        let refusals = [
            c.get_group(authed(get.clone(), &bob)).await.map(|_| ()),
            c.seek_group(authed(seek, &bob)).await.map(|_| ()),
            c.delete_group(authed(delete, &bob)).await.map(|_| ()),
        ];
        for refused in refusals {
            assert_eq!(refused.unwrap_err().code(), Code::PermissionDenied);
        }
        let group = c.get_group(authed(get, &alice)).await.unwrap().into_inner();
        assert_eq!((group.name.as_str(), group.backlog), ("default", 1));
        let grant = json!({"user": "bob", "permissions": ["publish", "consume"]});
        assert_eq!(
            call(
                &s,
                Some(&alice),
                Method::POST,
                "/queues/g/grants",
                Some(grant)
            )
            .await,
            StatusCode::OK
        );
        s.stop().await;
        (alice, bob)
    };
    let s = start(dir.path()).await;
    // Tokens, users, owners and grants survive the restart.
    let mut c = BrokerClient::connect(s.grpc.clone()).await.unwrap();
    let sub = proto::SubscribeRequest {
        queue: "g".into(),
        partition: 0,
        start: Some(proto::subscribe_request::Start::FromOffset(0)),
    };
    let mut stream = c.subscribe(authed(sub, &bob)).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(&first.message.unwrap().body[..], b"x");
    let delete = proto::DeleteQueueRequest { queue: "g".into() };
    assert_eq!(
        c.delete_queue(authed(delete.clone(), &bob))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    c.delete_queue(authed(delete, &alice)).await.unwrap();
    let fresh = login(&s, "bob", "bob-password").await;
    assert_eq!(
        call(&s, Some(&fresh), Method::GET, "/queues", None).await,
        StatusCode::OK
    );
    s.stop().await;
}

/// `call` with the response body too.
async fn call_json(
    s: &TestServer,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut r = http()
        .request(method, format!("{}{path}", s.http))
        .bearer_auth(token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let response = r.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The next offset of partition 0 of `queue` (how many messages it ever got).
async fn stored(s: &TestServer, token: &str, queue: &str) -> u64 {
    let (status, info) = call_json(s, token, Method::GET, &format!("/queues/{queue}"), None).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    info["partitions"][0]["next_offset"].as_u64().unwrap()
}

/// Regression (issue 19, item 1): a `dead_letter` naming somebody else's queue stole its
/// messages through redrive (or injected into it through nack); redrive needs consume on
/// the DLQ and publish on the queue; dead-letter moves stay within those rights also when
/// the DLQ was deleted and made again by someone else.
#[tokio::test]
async fn dead_letters_and_redrive_need_rights_on_both_queues() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let alice = register(&s, "alice").await;
    let mallory = register(&s, "mallory").await;
    let bob = register(&s, "bob").await;
    assert_eq!(
        call(&s, Some(&alice), Method::POST, "/queues/payroll", None).await,
        StatusCode::CREATED
    );
    let salary = Some(json!({"salary": 1}));
    assert_eq!(
        call(
            &s,
            Some(&alice),
            Method::POST,
            "/queues/payroll/messages",
            salary
        )
        .await,
        StatusCode::CREATED
    );
    for (queue, settings) in [
        (
            "loot",
            json!({"max_deliveries": 0, "dead_letter": "payroll"}),
        ),
        (
            "inject",
            json!({"max_deliveries": 1, "dead_letter": "payroll"}),
        ),
    ] {
        let path = format!("/queues/{queue}");
        assert_eq!(
            call(&s, Some(&mallory), Method::POST, &path, Some(settings)).await,
            StatusCode::FORBIDDEN,
            "{queue}"
        );
        assert_eq!(
            call(&s, Some(&mallory), Method::GET, &path, None).await,
            StatusCode::NOT_FOUND,
            "{queue} was not created"
        );
    }
    let mut c = BrokerClient::connect(s.grpc.clone()).await.unwrap();
    let loot = proto::CreateQueueRequest {
        queue: "loot".into(),
        settings: Some(proto::QueueSettings {
            max_deliveries: Some(0),
            dead_letter: Some("payroll".into()),
            ..Default::default()
        }),
    };
    let denied = c.create_queue(authed(loot, &mallory)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(stored(&s, &alice, "payroll").await, 1);
    // Her own queue with a new dead-letter queue: both hers.
    let own = json!({"max_deliveries": 1, "dead_letter": "own-dead"});
    assert_eq!(
        call(&s, Some(&mallory), Method::POST, "/queues/own", Some(own)).await,
        StatusCode::CREATED
    );
    assert_eq!(
        call(
            &s,
            Some(&mallory),
            Method::GET,
            "/queues/own-dead/messages",
            None
        )
        .await,
        StatusCode::OK
    );
    // Redrive: publish on the queue and consume on its DLQ.
    let both = json!({"user": "bob", "permissions": ["publish", "consume"]});
    assert_eq!(
        call(
            &s,
            Some(&mallory),
            Method::POST,
            "/queues/own/grants",
            Some(both.clone())
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        call(&s, Some(&bob), Method::POST, "/queues/own/redrive", None).await,
        StatusCode::FORBIDDEN
    );
    let consume = json!({"user": "bob", "permissions": ["consume"]});
    assert_eq!(
        call(
            &s,
            Some(&mallory),
            Method::POST,
            "/queues/own-dead/grants",
            Some(consume)
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        call(&s, Some(&bob), Method::POST, "/queues/own/redrive", None).await,
        StatusCode::OK
    );
    // The DLQ deleted and made again by alice: mallory's dead letters do not go there.
    assert_eq!(
        call(&s, Some(&mallory), Method::DELETE, "/queues/own-dead", None).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(&s, Some(&alice), Method::POST, "/queues/own-dead", None).await,
        StatusCode::CREATED
    );
    assert_eq!(
        call(
            &s,
            Some(&mallory),
            Method::POST,
            "/queues/own/messages",
            Some(json!(7))
        )
        .await,
        StatusCode::CREATED
    );
    let (status, got) = call_json(&s, &mallory, Method::GET, "/queues/own/messages", None).await;
    assert_eq!(status, StatusCode::OK);
    let id = got["messages"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        call(
            &s,
            Some(&mallory),
            Method::POST,
            &format!("/queues/own/messages/{id}/nack?delay=0"),
            None
        )
        .await,
        StatusCode::NO_CONTENT
    );
    // The refused move leaves the message in `own`: it is delivered again.
    let (status, again) = call_json(
        &s,
        &mallory,
        Method::GET,
        "/queues/own/messages?wait=20",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["messages"][0]["id"], id.as_str(), "{again}");
    assert_eq!(stored(&s, &alice, "own-dead").await, 0);
    s.stop().await;
}

/// Regression (issue 19, item 2): naming an existing queue without an owner (made before
/// auth was on) as `dead_letter` made the caller its owner, over HTTP and gRPC. Such
/// queues belong to the admin.
#[tokio::test]
async fn ownerless_queues_belong_to_the_admin() {
    let dir = tempfile::tempdir().unwrap();
    let open = TestServer::start_with(dir.path(), |_| {}).await;
    assert_eq!(
        http()
            .post(format!("{}/queues/legacy", open.http))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED
    );
    open.stop().await;
    let s = start(dir.path()).await;
    let mallory = register(&s, "mallory").await;
    let admin = login(&s, "admin", "admin-password").await;
    let grab = json!({"max_deliveries": 1, "dead_letter": "legacy"});
    assert_eq!(
        call(&s, Some(&mallory), Method::POST, "/queues/grab", Some(grab)).await,
        StatusCode::FORBIDDEN
    );
    let mut c = BrokerClient::connect(s.grpc.clone()).await.unwrap();
    let create = proto::CreateQueueRequest {
        queue: "grab2".into(),
        settings: Some(proto::QueueSettings {
            max_deliveries: Some(1),
            dead_letter: Some("legacy".into()),
            ..Default::default()
        }),
    };
    let denied = c.create_queue(authed(create, &mallory)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    // Creating it again (it exists) gives nothing either, not even its info.
    assert_eq!(
        call(&s, Some(&mallory), Method::POST, "/queues/legacy", None).await,
        StatusCode::FORBIDDEN
    );
    for path in ["/queues/legacy", "/queues/legacy/messages"] {
        let method = if path.ends_with("messages") {
            Method::GET
        } else {
            Method::DELETE
        };
        assert_eq!(
            call(&s, Some(&mallory), method, path, None).await,
            StatusCode::FORBIDDEN,
            "{path}"
        );
    }
    assert_eq!(
        call(&s, Some(&admin), Method::DELETE, "/queues/legacy", None).await,
        StatusCode::NO_CONTENT
    );
    s.stop().await;
}

/// Regression (issue 19, item 3): the auth layer checked the raw path while handlers
/// decoded it, so `/queues/%69nvoices` was checked as `%69nvoices` and served as
/// `invoices`; owners were stored under the encoded name.
#[tokio::test]
async fn percent_encoded_names_are_decided_as_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let alice = register(&s, "alice").await;
    let mallory = register(&s, "mallory").await;
    assert_eq!(
        call(&s, Some(&alice), Method::POST, "/queues/invoices", None).await,
        StatusCode::CREATED
    );
    assert_eq!(
        call(
            &s,
            Some(&alice),
            Method::POST,
            "/queues/%69nvoices/messages",
            Some(json!(1))
        )
        .await,
        StatusCode::CREATED
    );
    for (method, path) in [
        (Method::GET, "/queues/%69nvoices/messages"),
        (Method::POST, "/queues/%69nvoices/messages"),
        (Method::GET, "/queues/%69nvoices/log"),
        (Method::DELETE, "/queues/%69nvoices"),
        (Method::POST, "/queues/%69nvoices/grants"),
    ] {
        assert_eq!(
            call(
                &s,
                Some(&mallory),
                method.clone(),
                path,
                Some(json!({"user": "mallory", "permissions": ["consume"]}))
            )
            .await,
            StatusCode::FORBIDDEN,
            "{method} {path}"
        );
    }
    assert_eq!(stored(&s, &alice, "invoices").await, 1);
    // Created under an encoded name, owned under the decoded one.
    assert_eq!(
        call(&s, Some(&mallory), Method::POST, "/queues/%6Dine", None).await,
        StatusCode::CREATED
    );
    assert_eq!(
        call(
            &s,
            Some(&mallory),
            Method::POST,
            "/queues/mine/messages",
            Some(json!(1))
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(
        call(&s, Some(&alice), Method::DELETE, "/queues/mine", None).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&s, Some(&mallory), Method::DELETE, "/queues/mine", None).await,
        StatusCode::NO_CONTENT
    );
    // The same for exchanges.
    assert_eq!(
        call(
            &s,
            Some(&alice),
            Method::POST,
            "/exchanges/ax",
            Some(json!({"type": "fanout"}))
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(
        call(&s, Some(&mallory), Method::DELETE, "/exchanges/%61x", None).await,
        StatusCode::FORBIDDEN
    );
    s.stop().await;
}

/// Regression (issue 19, item 4): anyone could publish through an exchange into queues
/// they may not publish to. Now every queue it routes to needs publish, decided before
/// anything is appended.
#[tokio::test]
async fn exchange_publish_needs_publish_on_every_target() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let alice = register(&s, "alice").await;
    let bob = register(&s, "bob").await;
    assert_eq!(
        call(
            &s,
            Some(&alice),
            Method::POST,
            "/exchanges/ax",
            Some(json!({"type": "fanout"}))
        )
        .await,
        StatusCode::CREATED
    );
    for q in ["payroll", "public"] {
        assert_eq!(
            call(
                &s,
                Some(&alice),
                Method::POST,
                &format!("/queues/{q}"),
                None
            )
            .await,
            StatusCode::CREATED
        );
        let bind = json!({"queue": q});
        assert_eq!(
            call(
                &s,
                Some(&alice),
                Method::POST,
                "/exchanges/ax/bindings",
                Some(bind)
            )
            .await,
            StatusCode::CREATED
        );
    }
    let grant = json!({"user": "bob", "permissions": ["publish"]});
    assert_eq!(
        call(
            &s,
            Some(&alice),
            Method::POST,
            "/queues/public/grants",
            Some(grant.clone())
        )
        .await,
        StatusCode::OK
    );
    // Bob's publish through the exchange: refused, with the message of the refusal.
    let refused = || async {
        let (status, body) = call_json(
            &s,
            &bob,
            Method::POST,
            "/exchanges/ax/messages",
            Some(json!(1)),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(body["error"]["code"], "forbidden", "{body}");
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    // A queue bob may not see is not named (nor is it among the exchange's bindings he
    // sees).
    let why = refused().await;
    assert!(why.contains("exchange `ax`"), "{why}");
    assert!(!why.contains("payroll"), "{why}");
    assert_eq!(stored(&s, &alice, "payroll").await, 0);
    assert_eq!(
        stored(&s, &alice, "public").await,
        0,
        "nothing appended before deciding"
    );
    // One he may see but not publish to is named.
    let consume = json!({"user": "bob", "permissions": ["consume"]});
    let grant_payroll = |grant: Value| {
        call(
            &s,
            Some(&alice),
            Method::POST,
            "/queues/payroll/grants",
            Some(grant),
        )
    };
    assert_eq!(grant_payroll(consume).await, StatusCode::OK);
    let why = refused().await;
    assert!(why.contains("payroll"), "{why}");
    assert_eq!(grant_payroll(grant).await, StatusCode::OK);
    let (status, routed) = call_json(
        &s,
        &bob,
        Method::POST,
        "/exchanges/ax/messages",
        Some(json!(1)),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(routed["routed"].as_array().unwrap().len(), 2);
    s.stop().await;
}

/// Regressions (issue 19, items 5, 6 and 8): the admin's name cannot be registered; a
/// well-signed token of a user that does not exist gets 401 (HTTP and gRPC); usernames
/// are checked before anything else, and login bodies are small.
#[tokio::test]
async fn admin_name_ghost_tokens_and_huge_usernames_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let r = http()
        .post(format!("{}/auth/register", s.http))
        .json(&json!({"username": "admin", "password": "mallory-password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let ghost = {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let claims = json!({"sub": "ghost", "exp": 4_000_000_000u64, "iat": 1_700_000_000u64});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    assert_eq!(
        call(&s, Some(&ghost), Method::GET, "/queues", None).await,
        StatusCode::UNAUTHORIZED
    );
    let mut c = BrokerClient::connect(s.grpc.clone()).await.unwrap();
    let listed = c
        .list_queues(authed(proto::ListQueuesRequest {}, &ghost))
        .await
        .unwrap_err();
    assert_eq!(listed.code(), Code::Unauthenticated);
    for (username, status) in [
        ("a".repeat(100_000), StatusCode::PAYLOAD_TOO_LARGE),
        ("a".repeat(65), StatusCode::BAD_REQUEST),
        ("bad name".to_string(), StatusCode::BAD_REQUEST),
    ] {
        let r = http()
            .post(format!("{}/auth/login", s.http))
            .json(&json!({"username": username, "password": "whatever-password"}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            status,
            "{}",
            &username[..username.len().min(10)]
        );
        let body: Value = r.json().await.unwrap();
        assert!(
            body["error"]["message"].as_str().unwrap().len() < 300,
            "{body}"
        );
    }
    s.stop().await;
}

/// The `Publish` stream checks like `SendMessage`: a token to open it, and the publish
/// grant per request (a refused request is answered, the stream stays open).
#[tokio::test]
async fn publish_stream_needs_a_token_and_checks_each_request() {
    use tokio_stream::wrappers::ReceiverStream;
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let alice = register(&s, "alice").await;
    let bob = register(&s, "bob").await;
    let mut c = BrokerClient::connect(s.grpc.clone()).await.unwrap();
    for (queue, owner) in [("mine", &bob), ("hers", &alice)] {
        let create = proto::CreateQueueRequest {
            queue: queue.into(),
            settings: None,
        };
        c.create_queue(authed(create, owner)).await.unwrap();
    }
    let request = |seq: u64, queue: &str| proto::PublishRequest {
        seq,
        queue: queue.into(),
        messages: vec![proto::OutgoingMessage {
            body: bytes::Bytes::from_static(b"x"),
            ..Default::default()
        }],
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let denied = c.publish(ReceiverStream::new(rx)).await;
    let code = match denied {
        Err(status) => status.code(),
        Ok(response) => {
            tx.send(request(1, "mine")).await.unwrap();
            response.into_inner().message().await.unwrap_err().code()
        }
    };
    assert_eq!(code, Code::Unauthenticated);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut responses = c
        .publish(authed(ReceiverStream::new(rx), &bob))
        .await
        .unwrap()
        .into_inner();
    tx.send(request(1, "hers")).await.unwrap();
    tx.send(request(2, "mine")).await.unwrap();
    let mut got = std::collections::HashMap::new();
    for _ in 0..2 {
        let r = responses.message().await.unwrap().unwrap();
        got.insert(r.seq, r.error.map(|e| Code::from(e.code as i32)));
    }
    assert_eq!(got[&1], Some(Code::PermissionDenied));
    assert_eq!(got[&2], None);
    s.stop().await;
}

/// The names of the queues `GET /queues{query}` lists to the holder of `token`.
async fn listed(s: &TestServer, token: &str, query: &str) -> Vec<String> {
    let (status, body) = call_json(s, token, Method::GET, &format!("/queues{query}"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap().to_string())
        .collect()
}

/// A queue's info and its place in lists are for those who may see it: its owner, the
/// admin and anyone holding a grant on it. Any user could read every queue's settings and
/// counts and list every queue's name (found by the contract helper), over HTTP and gRPC.
#[tokio::test]
async fn queues_are_seen_only_by_their_owner_grantees_and_the_admin() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let alice = register(&s, "alice").await;
    let bob = register(&s, "bob").await;
    let admin = login(&s, "admin", "admin-password").await;
    for (token, queue) in [(&alice, "alices"), (&bob, "bobs")] {
        assert_eq!(
            call(
                &s,
                Some(token),
                Method::POST,
                &format!("/queues/{queue}"),
                None
            )
            .await,
            StatusCode::CREATED
        );
    }
    assert_eq!(listed(&s, &bob, "").await, ["bobs", "bobs.dlq"]);
    assert_eq!(listed(&s, &bob, "?limit=10").await, ["bobs", "bobs.dlq"]);
    // Pages of one: the cursor names only queues bob may see (it named every queue).
    let mut after = String::new();
    let (mut cursors, mut paged) = (Vec::new(), Vec::new());
    loop {
        let path = format!("/queues?limit=1{after}");
        let (status, page) = call_json(&s, &bob, Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        paged.extend(
            page["queues"]
                .as_array()
                .unwrap()
                .iter()
                .map(|q| q["name"].as_str().unwrap().to_string()),
        );
        let Some(next) = page["next"].as_str() else {
            break;
        };
        cursors.push(next.to_string());
        after = format!("&after={next}");
    }
    assert_eq!(paged, ["bobs", "bobs.dlq"]);
    assert_eq!(cursors, ["bobs"]);
    // Creating an existing queue again answers its info only to those who may see it.
    assert_eq!(
        call(&s, Some(&bob), Method::POST, "/queues/alices", None).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        listed(&s, &admin, "").await,
        ["alices", "alices.dlq", "bobs", "bobs.dlq"]
    );
    assert_eq!(
        call(&s, Some(&bob), Method::GET, "/queues/alices", None).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&s, Some(&bob), Method::GET, "/queues/nobodys", None).await,
        StatusCode::NOT_FOUND,
        "a missing queue is missing to everyone"
    );
    let mut c = BrokerClient::connect(s.grpc.clone()).await.unwrap();
    let get = proto::GetQueueRequest {
        queue: "alices".into(),
    };
    let denied = c.get_queue(authed(get.clone(), &bob)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let names = |r: proto::ListQueuesResponse| -> Vec<String> {
        r.queues.into_iter().map(|q| q.name).collect()
    };
    let list = c
        .list_queues(authed(proto::ListQueuesRequest {}, &bob))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(list), ["bobs", "bobs.dlq"]);
    // An exchange shows others only its bindings to queues they may see.
    assert_eq!(
        call(
            &s,
            Some(&alice),
            Method::POST,
            "/exchanges/alx",
            Some(json!({"type": "fanout"}))
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(
        call(
            &s,
            Some(&alice),
            Method::POST,
            "/exchanges/alx/bindings",
            Some(json!({"queue": "alices"}))
        )
        .await,
        StatusCode::CREATED
    );
    let bound = |token: String, path: &'static str| {
        let s = &s;
        async move {
            let (status, body) = call_json(s, &token, Method::GET, path, None).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let info = if path == "/exchanges" {
                body["exchanges"][0].clone()
            } else {
                body
            };
            info["bindings"].as_array().map_or(0, Vec::len)
        }
    };
    assert_eq!(bound(bob.clone(), "/exchanges/alx").await, 0);
    assert_eq!(bound(bob.clone(), "/exchanges").await, 0);
    assert_eq!(bound(alice.clone(), "/exchanges/alx").await, 1);
    assert_eq!(bound(admin.clone(), "/exchanges").await, 1);

    // `/metrics` names only the queues the caller may see (every queue names its own
    // series: its backlog gauges, and the published counter once a message is in).
    assert_eq!(
        call(
            &s,
            Some(&alice),
            Method::POST,
            "/queues/alices/messages",
            None
        )
        .await,
        StatusCode::CREATED
    );
    let scraped = |token: String| {
        let s = &s;
        async move {
            let r = http()
                .get(format!("{}/metrics", s.http))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let text = r.text().await.unwrap();
            let mut queues: Vec<String> = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split("queue=\"").nth(1)?.split('"').next())
                .map(str::to_string)
                .collect();
            queues.sort();
            queues.dedup();
            queues
        }
    };
    assert_eq!(scraped(bob.clone()).await, ["bobs", "bobs.dlq"]);
    assert_eq!(
        scraped(admin.clone()).await,
        ["alices", "alices.dlq", "bobs", "bobs.dlq"]
    );
    assert_eq!(scraped(alice.clone()).await, ["alices", "alices.dlq"]);

    // A grant of any permission shows the queue.
    let grant = json!({"user": "bob", "permissions": ["publish"]});
    assert_eq!(
        call(
            &s,
            Some(&alice),
            Method::POST,
            "/queues/alices/grants",
            Some(grant)
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(listed(&s, &bob, "").await, ["alices", "bobs", "bobs.dlq"]);
    assert_eq!(
        call(&s, Some(&bob), Method::GET, "/queues/alices", None).await,
        StatusCode::OK
    );
    let info = c.get_queue(authed(get, &bob)).await.unwrap().into_inner();
    assert_eq!(info.name, "alices");
    assert_eq!(bound(bob.clone(), "/exchanges/alx").await, 1);
    assert_eq!(scraped(bob.clone()).await, ["alices", "bobs", "bobs.dlq"]);
    s.stop().await;
}

/// A queue or exchange that does not exist is a 404 to anyone (a user's typo is told as
/// such, as `GET /queues/{q}` tells it), not a 403; one that exists but is someone
/// else's stays a 403. HTTP and gRPC alike.
#[tokio::test]
async fn a_missing_queue_or_exchange_is_not_found_not_forbidden() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let alice = register(&s, "alice").await;
    let bob = register(&s, "bob").await;
    for path in ["/queues/owned", "/exchanges/owned"] {
        let body = path
            .starts_with("/exchanges")
            .then(|| json!({"type": "fanout"}));
        assert_eq!(
            call(&s, Some(&bob), Method::POST, path, body).await,
            StatusCode::CREATED
        );
    }
    let grant = json!({"user": "carol", "permissions": ["publish"]});
    let binding = json!({"queue": "owned"});
    let cases = [
        (Method::POST, "messages", None),
        (Method::GET, "messages", None),
        (Method::DELETE, "", None),
        (Method::POST, "grants", Some(grant)),
        (Method::GET, "log?partition=0", None),
        (Method::DELETE, "groups/default", None),
    ];
    for (method, tail, body) in cases {
        for (queue, want, code) in [
            ("nosuchq", StatusCode::NOT_FOUND, "queue_not_found"),
            ("owned", StatusCode::FORBIDDEN, "forbidden"),
        ] {
            let path = format!("/queues/{queue}/{tail}");
            let path = path.trim_end_matches('/');
            let (status, answer) = call_json(&s, &alice, method.clone(), path, body.clone()).await;
            assert_eq!(status, want, "{method} {path}: {answer}");
            assert_eq!(answer["error"]["code"], code, "{method} {path}: {answer}");
        }
    }
    for (exchange, want, code) in [
        ("nosuchx", StatusCode::NOT_FOUND, "exchange_not_found"),
        ("owned", StatusCode::FORBIDDEN, "forbidden"),
    ] {
        let path = format!("/exchanges/{exchange}/bindings");
        let (status, answer) =
            call_json(&s, &alice, Method::POST, &path, Some(binding.clone())).await;
        assert_eq!(status, want, "{path}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{path}: {answer}");
    }
    let mut c = BrokerClient::connect(s.grpc.clone()).await.unwrap();
    for (queue, want) in [
        ("nosuchq", Code::NotFound),
        ("owned", Code::PermissionDenied),
    ] {
        let delete = proto::DeleteQueueRequest {
            queue: queue.into(),
        };
        let refused = c.delete_queue(authed(delete, &alice)).await.unwrap_err();
        assert_eq!(refused.code(), want, "{queue}: {refused:?}");
        let group = proto::DeleteGroupRequest {
            queue: queue.into(),
            group: String::new(),
        };
        let refused = c.delete_group(authed(group, &alice)).await.unwrap_err();
        assert_eq!(refused.code(), want, "{queue} group: {refused:?}");
    }
    s.stop().await;
}

/// Creates the queues `over-http` and `over-grpc` and the fanout exchange `fan` as the
/// holder of `token` (each answered 201).
async fn create_queues_and_exchange(s: &TestServer, token: &str) {
    for (path, body) in [
        ("/queues/over-http", None),
        ("/queues/over-grpc", None),
        ("/exchanges/fan", Some(json!({"type": "fanout"}))),
    ] {
        let created = call(s, Some(token), Method::POST, path, body).await;
        assert_eq!(created, StatusCode::CREATED, "{path}");
    }
}

/// A queue or exchange deleted (over HTTP or gRPC) takes its owner and grants with it: made
/// again by someone else it is theirs alone (the old owner may not delete it, an old
/// grantee may not publish to it), and this holds after a restart.
#[tokio::test]
async fn a_deleted_queue_or_exchange_is_made_again_without_its_owner_or_grants() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let alice = register(&s, "alice").await;
    let bob = register(&s, "bob").await;
    let carol = register(&s, "carol").await;
    let grant = json!({"user": "bob", "permissions": ["publish", "consume"]});
    create_queues_and_exchange(&s, &alice).await;
    for queue in ["over-http", "over-grpc"] {
        let granted = call(
            &s,
            Some(&alice),
            Method::POST,
            &format!("/queues/{queue}/grants"),
            Some(grant.clone()),
        )
        .await;
        assert_eq!(granted, StatusCode::OK);
    }
    let deleted = call(&s, Some(&alice), Method::DELETE, "/queues/over-http", None).await;
    assert_eq!(deleted, StatusCode::NO_CONTENT);
    // Their dead-letter queues are not deleted with them: alice's until she does.
    for dlq in ["over-http.dlq", "over-grpc.dlq"] {
        let path = format!("/queues/{dlq}");
        let deleted = call(&s, Some(&alice), Method::DELETE, &path, None).await;
        assert_eq!(deleted, StatusCode::NO_CONTENT, "{dlq}");
    }
    let mut c = BrokerClient::connect(s.grpc.clone()).await.unwrap();
    let delete = proto::DeleteQueueRequest {
        queue: "over-grpc".into(),
    };
    c.delete_queue(authed(delete, &alice)).await.unwrap();
    let deleted = call(&s, Some(&alice), Method::DELETE, "/exchanges/fan", None).await;
    assert_eq!(deleted, StatusCode::NO_CONTENT);
    create_queues_and_exchange(&s, &carol).await;
    s.stop().await;
    let s = start(dir.path()).await;
    for queue in ["over-http", "over-grpc"] {
        let path = format!("/queues/{queue}/messages");
        let publish = call(&s, Some(&bob), Method::POST, &path, Some(json!("x"))).await;
        assert_eq!(publish, StatusCode::FORBIDDEN, "bob publishes to {queue}");
        let path = format!("/queues/{queue}");
        let delete = call(&s, Some(&alice), Method::DELETE, &path, None).await;
        assert_eq!(delete, StatusCode::FORBIDDEN, "alice deletes {queue}");
        let path = format!("/queues/{queue}/messages");
        let publish_own = call(&s, Some(&carol), Method::POST, &path, Some(json!("x"))).await;
        assert_eq!(
            publish_own,
            StatusCode::CREATED,
            "carol publishes to {queue}"
        );
    }
    let delete = call(&s, Some(&alice), Method::DELETE, "/exchanges/fan", None).await;
    assert_eq!(delete, StatusCode::FORBIDDEN);
    let delete = call(&s, Some(&carol), Method::DELETE, "/exchanges/fan", None).await;
    assert_eq!(delete, StatusCode::NO_CONTENT);
    s.stop().await;
}
