//! Open-loop load on `POST /api/v1/alerts`: webhooks are sent on a fixed schedule whatever the
//! answers (no coordinated omission), each with a distinct alert, and answer times and codes
//! are counted.
//!
//! ```sh
//! cargo run --release -p aistack-actioner --example webhook_load -- URL TOKEN RATE SECONDS
//! ```
//!
//! `tests/bench/webhook.sh` runs it against a release actioner in dry-run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, token, rate, seconds] = &args[..] else {
        return Err("usage: webhook_load URL TOKEN RATE SECONDS".into());
    };
    let rate: u64 = rate.parse()?;
    let seconds: u64 = seconds.parse()?;
    aistack_common::install_tls_provider();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()?;
    let latencies = Arc::new(Mutex::new(Vec::with_capacity((rate * seconds) as usize)));
    let codes = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let counter = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(2048));
    let total = rate * seconds;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        // Send number i at i / rate seconds.
        let due = started + Duration::from_nanos(i * 1_000_000_000 / rate);
        tokio::time::sleep_until(due.into()).await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            *codes
                .lock()
                .unwrap()
                .entry("dropped (2048 in flight)".into())
                .or_default() += 1;
            continue;
        };
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let body = format!(
            r#"{{"version":"4","groupKey":"{{}}:{{alertname=\"LoadTest\"}}","status":"firing","receiver":"aistack","externalURL":"http://am:9093","alerts":[{{"status":"firing","labels":{{"alertname":"LoadTest","severity":"warning","instance":"gpu-box:9470","n":"{n}"}},"annotations":{{"summary":"load"}},"startsAt":"2026-11-22T21:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":"{n:016x}"}}]}}"#
        );
        let (client, url, token, latencies, codes) = (
            client.clone(),
            url.clone(),
            token.clone(),
            latencies.clone(),
            codes.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let result = client
                .post(&url)
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            let took = sent.elapsed();
            let code = match result {
                Ok(r) => r.status().as_u16().to_string(),
                Err(e) => format!(
                    "error: {}",
                    if e.is_connect() { "connect" } else { "other" }
                ),
            };
            latencies.lock().unwrap().push(took);
            *codes.lock().unwrap().entry(code).or_default() += 1;
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    let at = |q: f64| {
        l.get(((l.len() as f64 * q) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let ok = codes.lock().unwrap().get("200").copied().unwrap_or(0);
    println!(
        "rate {rate}/s for {seconds}s: sent {}, 200: {ok} ({:.0}/s), p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, codes {:?}",
        l.len(),
        ok as f64 / elapsed,
        ms(at(0.5)),
        ms(at(0.99)),
        ms(at(1.0)),
        codes.lock().unwrap()
    );
    Ok(())
}
