//! Attacks on the actioner's HTTP surface: connections held busy by slow request bodies, and
//! the wake relay's shared rate limit spent by clients without a key.
//!
//! Each test's comment tells what the attack did before the code was mended; its name, what
//! must hold now.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use aistack_actioner::auth::Auth;
use aistack_actioner::{Actioner, build_actions};
use aistack_common::server::{ConnectionLimits, serve_until};
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

mod support;
use support::{TOKEN, config};

fn start(dir: &std::path::Path) -> Actioner {
    let config = config(&dir.join("state"), "", "");
    Actioner::start(
        &config,
        Auth::from_secrets(TOKEN, None, Some("relay-key")),
        build_actions(&config).unwrap(),
    )
    .unwrap()
}

/// Every connection slot is taken by a client that sent a complete request head for
/// `POST /api/v1/wake` (no credentials needed to get that far) and is dribbling its body.
/// The body is read before any check, so each such request counts as "in flight" and is never
/// evicted, for up to the 90 s request timeout. A health check on a new connection is then
/// shed at once: with max_connections such clients (one host can open them), /healthz and
/// webhooks get nothing.
#[test]
fn slow_request_bodies_do_not_lock_out_health_checks() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let address: SocketAddr = runtime.block_on(async {
        let actioner = start(dir.path());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let limits = ConnectionLimits {
            max_connections: 16,
            header_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(1),
        };
        tokio::spawn(serve_until(
            listener,
            actioner.router,
            limits,
            std::future::pending(),
        ));
        address
    });
    let slow: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut s = TcpStream::connect(address).unwrap();
            s.write_all(
                b"POST /api/v1/wake HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n{\"target\":",
            )
            .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let answer = (|| -> std::io::Result<String> {
        let mut s = TcpStream::connect(address)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    })();
    let took = started.elapsed();
    drop(slow);
    let answer = answer.unwrap_or_else(|e| format!("error: {e}"));
    assert!(
        answer.starts_with("HTTP/1.1 200") && took < Duration::from_secs(1),
        "/healthz with 16 slow bodies holding the 16 slots: {answer:?} after {took:?}"
    );
}

async fn wake(router: &axum::Router, client: [u8; 4], bearer: bool, body: &str) -> StatusCode {
    let mut request = Request::builder()
        .method("POST")
        .uri("/api/v1/wake")
        .header("content-type", "application/json");
    if bearer {
        request = request.header("authorization", format!("Bearer {TOKEN}"));
    }
    let mut request = request.body(Body::from(body.to_owned())).unwrap();
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from((client, 40000))));
    router.clone().oneshot(request).await.unwrap().status()
}

/// Ten addresses without the key, six requests each (each answered 403), spend the relay's
/// total budget (60 a minute by default): the rate limit is taken before the key or the token
/// is checked. A caller with the bearer token, from an address never seen, is then refused
/// with 429 — and the flood can be kept up forever from a handful of addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_the_key_cannot_spend_the_relay_for_everyone() {
    let dir = tempfile::tempdir().unwrap();
    let actioner = start(dir.path());
    let router = &actioner.router;
    for n in 0..10u8 {
        for _ in 0..6 {
            let status = wake(
                router,
                [10, 0, 0, n],
                false,
                r#"{"target":"nas","key":"guess"}"#,
            )
            .await;
            assert_eq!(status, StatusCode::FORBIDDEN);
        }
    }
    let status = wake(router, [192, 168, 1, 20], true, r#"{"target":"nas"}"#).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "an authenticated wake after 60 refused guesses from 10 other addresses"
    );
}
