//! Two actioner replicas with `ha: {lease: ...}`: the real binaries, electing a leader on a
//! coordination.k8s.io/v1 Lease of the stand-in API server (tests/src/kubernetes.rs, which
//! refuses a write on a stale resourceVersion as the real one does), sharing one state
//! directory as two pods share a ReadWriteMany volume. Only the leader is ready and acts; the
//! leader killed in the middle of a failover is replaced within 15 s, and the new leader
//! never runs the failover again.

use std::process::Command;
use std::time::{Duration, Instant};

use aistack_tests::kubernetes::{FakeKubernetes, Pods};
use aistack_tests::stub::{StubServer, gpu_report};
use aistack_tests::{
    Container, Daemon, Network, binary, bind, docker, get, get_with_token, glibc_image, post_json,
    wait_for,
};
use serde_json::{Value, json};

const TOKEN: &str = "0123456789abcdef";
const LEASE: (&str, &str) = ("aistack", "aistack-actioner");

struct Cluster {
    api: FakeKubernetes,
    dir: tempfile::TempDir,
    vllm: StubServer,
    ollama: StubServer,
    exporter: StubServer,
    config: std::path::PathBuf,
}

/// vLLM serving (its pods take `vllm_stop` to shut down), Ollama at 0, the Lease as shipped,
/// and one config both replicas read.
fn cluster(vllm_stop: Duration) -> Cluster {
    cluster_on("127.0.0.1", vllm_stop)
}

/// [`cluster`] with the stand-in API server, vLLM, Ollama and the exporter on `address` (a
/// test network's gateway, for replicas in containers).
fn cluster_on(address: &str, vllm_stop: Duration) -> Cluster {
    let api = FakeKubernetes::start_on(address);
    api.add_deployment(
        "ml",
        "vllm",
        1,
        &[("app", "vllm")],
        Pods {
            ready_after: vllm_stop,
            ..Pods::default()
        },
    );
    api.add_deployment("ml", "ollama", 0, &[("app", "ollama")], Pods::default());
    api.add_service("ml", "inference", &[("app", "vllm")]);
    api.add_lease(LEASE.0, LEASE.1);
    let stub = || StubServer::start_on_nodes(&[address]).0.remove(0);
    let (vllm, ollama, exporter) = (stub(), stub(), stub());
    vllm.set("/health", 200, "");
    ollama.set("/api/tags", 200, r#"{"models":[]}"#);
    exporter.set("/api/v1/gpu", 200, &gpu_report(false));
    let dir = tempfile::tempdir().unwrap();
    aistack_tests::write_secret(dir.path().join("token"), TOKEN);
    let cluster = Cluster {
        api,
        config: dir.path().join("actioner.yaml"),
        dir,
        vllm,
        ollama,
        exporter,
    };
    let state = cluster.dir.path().join("state");
    let token = cluster.dir.path().join("token");
    let text = cluster.config_text(&state.display().to_string(), &token.display().to_string());
    std::fs::write(&cluster.config, text).unwrap();
    cluster
}

impl Cluster {
    /// The config the replicas read, with the journal in `state_dir` and the token in
    /// `token_file`.
    fn config_text(&self, state_dir: &str, token_file: &str) -> String {
        format!(
            r#"
host: gpu-box
state_dir: {state_dir}
exporter_url: {exporter}
auth: {{bearer_token_file: {token_file}}}
ha: {{lease: {ns}/{name}}}
rules:
  - {{name: failover-when-gaming, match: {{alertname: AistackGpuHostWorkload}}, on: firing, action: failover}}
actions:
  failover:
    platform: kubernetes
    kubernetes: {{namespace: ml, primary: vllm, fallback: ollama, service: inference}}
    primary_health_url: "{vllm}/health"
    fallback_health_url: "{ollama}/api/tags"
    fallback_timeout: 30s
    primary_timeout: 4s
"#,
            exporter = self.exporter.url,
            ns = LEASE.0,
            name = LEASE.1,
            vllm = self.vllm.url,
            ollama = self.ollama.url,
        )
    }

    /// Who holds the Lease.
    fn holder(&self) -> Option<String> {
        self.api.lease(LEASE.0, LEASE.1)?["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_owned)
    }
}

/// A replica named `pod` (its `POD_NAME`).
fn replica(cluster: &Cluster, pod: &str) -> Daemon {
    let mut command = Command::new(binary("aistack-actioner"));
    command
        .env("KUBECONFIG", &cluster.api.kubeconfig)
        .env("HOME", cluster.dir.path())
        .env("POD_NAME", pod)
        .env_remove("KUBERNETES_SERVICE_HOST");
    Daemon::start_with(
        command,
        &["--config.file", cluster.config.to_str().unwrap()],
    )
}

fn ready(replica: &Daemon) -> bool {
    get(&replica.url("/readyz")).status == 200
}

/// Sends the webhook of a game on gpu-box to `replica`; its status.
fn webhook(replica: &Daemon) -> u16 {
    webhook_to(&replica.url(""))
}

/// [`webhook`] to the replica at `base` (`http://ADDRESS:PORT`).
fn webhook_to(base: &str) -> u16 {
    let body = json!({
        "version": "4", "status": "firing", "receiver": "aistack-actioner",
        "groupLabels": {"alertname": "AistackGpuHostWorkload"}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093", "groupKey": "{}:{alertname=\"AistackGpuHostWorkload\"}",
        "truncatedAlerts": 0,
        "alerts": [{
            "status": "firing",
            "labels": {"alertname": "AistackGpuHostWorkload", "severity": "info", "instance": "gpu-box:9470", "gpu": "0"},
            "annotations": {"summary": "Someone else is using GPU 0 on gpu-box:9470"},
            "startsAt": "2026-11-22T22:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph", "fingerprint": "4f1c9b5a0e2d7c36"
        }]
    });
    post_json(
        &format!("{base}/api/v1/alerts"),
        Some(TOKEN),
        &body.to_string(),
    )
    .status
}

fn journal(replica: &Daemon) -> Vec<Value> {
    journal_at(&replica.url(""))
}

/// The journal of the replica at `base`, newest first.
fn journal_at(base: &str) -> Vec<Value> {
    serde_json::from_str(&get_with_token(&format!("{base}/api/v1/actions?limit=200"), TOKEN).body)
        .unwrap_or_default()
}

fn events(journal: &[Value], rule: &str, event: &str) -> usize {
    journal
        .iter()
        .filter(|e| e["rule"] == rule && e["event"] == event)
        .count()
}

#[test]
fn the_leader_killed_mid_failover_is_replaced_within_15s_and_nothing_runs_twice() {
    // vLLM's pods take 20 s to stop: the failover is still waiting when its leader dies.
    let cluster = cluster(Duration::from_secs(20));
    let a = replica(&cluster, "actioner-a");
    let b = replica(&cluster, "actioner-b");
    let first = wait_for(Duration::from_secs(15), "a leader", || cluster.holder());
    let (leader, follower) = if first.starts_with("actioner-a_") {
        (a, b)
    } else {
        (b, a)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready(&leader) {
        assert!(
            Instant::now() < deadline,
            "the leader ({first}) not ready:\n{}\n---\n{}",
            leader.log().join("\n"),
            follower.log().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!ready(&follower), "only the leader says it leads");
    assert_eq!(
        get(&follower.url("/healthz")).status,
        200,
        "the follower is alive"
    );
    let metrics = get(&follower.url("/metrics")).body;
    assert!(metrics.contains("aistack_actioner_leader 0"), "{metrics}");
    let metrics = get(&leader.url("/metrics")).body;
    assert!(metrics.contains("aistack_actioner_leader 1"), "{metrics}");

    // The webhook reaches the follower (a Service may send it to either): forwarded, and
    // what the leader answered comes back; without the token, the leader's 401.
    assert_eq!(webhook(&follower), 200);
    let unauthorized = post_json(&follower.url("/api/v1/alerts"), None, "{}");
    assert_eq!(unauthorized.status, 401, "{}", unauthorized.body);
    // A chunked upload (no Content-Length, as some clients send) is forwarded too.
    let chunked = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Authorization: Bearer {TOKEN}"),
            "-H",
            "Content-Type: application/json",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            r#"{"version":"4","status":"firing","receiver":"r","groupLabels":{},"commonLabels":{},"commonAnnotations":{},"externalURL":"http://am","groupKey":"{}:{}","truncatedAlerts":0,"alerts":[]}"#,
            &follower.url("/api/v1/alerts"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&chunked.stdout), "200");
    wait_for(Duration::from_secs(10), "the failover started", || {
        (events(&journal(&leader), "failover-when-gaming", "started") == 1).then_some(())
    });
    wait_for(Duration::from_secs(10), "vLLM told to stop", || {
        (cluster.api.deployment("ml", "vllm")["spec"]["replicas"] == 0).then_some(())
    });
    // Still waiting for vLLM's pods to stop: nothing has ended.
    assert_eq!(
        events(&journal(&leader), "failover-when-gaming", "succeeded"),
        0
    );
    let old = cluster.holder().unwrap();

    // The leader's node dies mid-action.
    let killed = Instant::now();
    drop(leader);
    wait_for(Duration::from_secs(20), "the follower to lead", || {
        ready(&follower).then_some(())
    });
    let took = killed.elapsed();
    println!(
        "ha: leader killed -> the other replica ready in {:.2}s",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(15), "takeover in {took:?}");
    let new = cluster.holder().unwrap();
    assert_ne!(new, old);
    let lease = cluster.api.lease(LEASE.0, LEASE.1).unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 2, "{lease}");

    // The new leader read the shared journal: the failover was interrupted, not redone.
    let entries = journal(&follower);
    let interrupted = entries
        .iter()
        .find(|e| e["rule"] == "failover-when-gaming" && e["event"] == "failed")
        .unwrap_or_else(|| panic!("{entries:#?}"));
    assert!(
        interrupted["detail"]
            .as_str()
            .unwrap()
            .starts_with("interrupted"),
        "{interrupted}"
    );
    // Alertmanager retries the webhook at the new leader: a duplicate, nothing runs.
    assert_eq!(webhook(&follower), 200);
    std::thread::sleep(Duration::from_secs(1));
    let entries = journal(&follower);
    assert_eq!(
        events(&entries, "failover-when-gaming", "started"),
        1,
        "{entries:#?}"
    );
    let scaled = cluster
        .api
        .patches()
        .iter()
        .filter(|p| p.path.ends_with("/vllm/scale"))
        .count();
    assert_eq!(scaled, 1, "vLLM was told to stop once");
    // All the election asked is what the component's Role grants: get and update (PUT) on
    // the one Lease.
    for request in cluster.api.requests() {
        if request.path.contains("/leases") {
            assert!(
                request.path
                    == "/apis/coordination.k8s.io/v1/namespaces/aistack/leases/aistack-actioner"
                    && ["GET", "PUT"].contains(&request.method.as_str()),
                "{} {}",
                request.method,
                request.path
            );
        }
    }
}

#[test]
fn a_leader_stopped_cleanly_hands_over_at_once() {
    let cluster = cluster(Duration::from_millis(300));
    let a = replica(&cluster, "actioner-a");
    wait_for(Duration::from_secs(10), "a leading", || {
        ready(&a).then_some(())
    });
    let b = replica(&cluster, "actioner-b");
    std::thread::sleep(Duration::from_secs(3));
    assert!(!ready(&b), "b follows while a leads");
    let stopped = Instant::now();
    let status = a.terminate();
    assert!(status.success(), "{status:?}");
    wait_for(Duration::from_secs(10), "b leading", || {
        ready(&b).then_some(())
    });
    let took = stopped.elapsed();
    println!(
        "ha: leader stopped -> the other ready in {:.2}s",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(5),
        "the lease was given up, not left to expire: {took:?}"
    );
    assert!(cluster.holder().unwrap().starts_with("actioner-b_"));
}

/// The API server stops answering: the leader cannot renew, and ends itself within the renew
/// deadline — before the lease could expire for anyone — however long the requests hang. Once
/// the API server answers again, the other replica leads.
#[test]
fn a_leader_that_cannot_renew_steps_down_before_the_lease_expires() {
    let cluster = cluster(Duration::from_millis(300));
    let mut a = replica(&cluster, "actioner-a");
    wait_for(Duration::from_secs(10), "a leading", || {
        ready(&a).then_some(())
    });
    let b = replica(&cluster, "actioner-b");
    std::thread::sleep(Duration::from_secs(3));
    let renewed = Instant::now();
    cluster.api.stall_leases(true);
    let status = wait_for(Duration::from_secs(10), "a to step down", || a.exited());
    let took = renewed.elapsed();
    println!(
        "ha: API server stalled -> the leader stopped after {:.2}s",
        took.as_secs_f64()
    );
    assert!(!status.success(), "{status:?}");
    // Its last renewal was at most one round (2 s) before the stall; the lease lasts 8 s.
    assert!(took < Duration::from_secs(6), "stepped down after {took:?}");
    assert!(
        a.log()
            .iter()
            .any(|l| l.contains("could not renew the lease")),
        "{:#?}",
        a.log()
    );
    assert!(!ready(&b), "nobody leads while the API server is gone");
    cluster.api.stall_leases(false);
    wait_for(Duration::from_secs(15), "b leading", || {
        ready(&b).then_some(())
    });
    assert!(cluster.holder().unwrap().starts_with("actioner-b_"));
}

/// The leader frozen (SIGSTOP: a paused VM, a node stalled in swap) in the middle of a
/// failover: the other replica takes over once the lease expires and journals the run as
/// interrupted. Woken after that (SIGCONT), the old leader finds its renew deadline passed: it
/// writes nothing more to the shared journal, calls the API server for nothing more — not the
/// next step of its run, not the journal line that would end it — and stops.
#[test]
fn a_frozen_leader_woken_after_the_takeover_writes_and_does_nothing_more() {
    // vLLM's pods stop 6 s after the scale-down: while the leader is frozen. Woken, its run's
    // next look would find them gone and go on to start Ollama at once.
    let cluster = cluster(Duration::from_secs(6));
    let a = replica(&cluster, "actioner-a");
    let b = replica(&cluster, "actioner-b");
    let first = wait_for(Duration::from_secs(15), "a leader", || cluster.holder());
    let (mut leader, follower) = if first.starts_with("actioner-a_") {
        (a, b)
    } else {
        (b, a)
    };
    wait_for(Duration::from_secs(10), "the leader ready", || {
        ready(&leader).then_some(())
    });
    assert_eq!(webhook(&leader), 200);
    wait_for(Duration::from_secs(10), "vLLM told to stop", || {
        (cluster.api.deployment("ml", "vllm")["spec"]["replicas"] == 0).then_some(())
    });
    let signal = |sig: &str| {
        let status = Command::new("kill")
            .args([sig, &leader.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig}");
    };
    signal("-STOP");
    wait_for(Duration::from_secs(20), "the other replica to lead", || {
        ready(&follower).then_some(())
    });
    let entries = journal(&follower);
    assert_eq!(
        events(&entries, "failover-when-gaming", "failed"),
        1,
        "journaled as interrupted: {entries:#?}"
    );
    let file = cluster.dir.path().join("state/journal.jsonl");
    let before = std::fs::read(&file).unwrap();
    let not_the_lease = |api: &FakeKubernetes| {
        api.requests()
            .into_iter()
            .filter(|r| !r.path.contains("/leases"))
            .count()
    };
    let calls = not_the_lease(&cluster.api);

    signal("-CONT");
    let status = wait_for(Duration::from_secs(10), "the old leader to stop", || {
        leader.exited()
    });
    assert!(!status.success(), "{status:?}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "the old leader wrote to the shared journal"
    );
    assert_eq!(
        not_the_lease(&cluster.api),
        calls,
        "the old leader called the API server after it woke"
    );
    assert!(
        leader.log().iter().any(|l| l.contains("stopping at once")),
        "{:#?}",
        leader.log()
    );
    assert!(ready(&follower), "the new leader leads on");
    assert!(
        cluster.api.deployment("ml", "ollama")["spec"]["replicas"] == 0,
        "the old leader's run went no further"
    );
}

/// The same on the Docker engine, each replica a "node" of its own: two actioner containers
/// with their own addresses on a test network (`POD_IP` advertised, as the downward API gives
/// it), the journal a directory both mount (the ReadWriteMany claim), the stand-in API server,
/// vLLM, Ollama and the exporter on the network's gateway. A webhook sent to the follower's
/// address is forwarded to the leader's; the leader's container killed (`docker kill`) in the
/// middle of the failover, the other leads within 15 s and nothing runs twice.
#[test]
fn replicas_in_containers_the_leader_killed_mid_failover_and_nothing_runs_twice() {
    let (network, prefix) = Network::with_subnet("ha");
    let cluster = cluster_on(&network.gateway(), Duration::from_secs(20));
    let etc = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    aistack_tests::write_secret(etc.path().join("token"), TOKEN);
    std::fs::copy(&cluster.api.kubeconfig, etc.path().join("kubeconfig")).unwrap();
    std::fs::write(
        etc.path().join("actioner.yaml"),
        cluster.config_text("/state", "/etc/aistack/token"),
    )
    .unwrap();
    let user = aistack_tests::owner_of(state.path());
    let replica = |pod: &str, ip: &str| {
        Container::run_image_with(
            pod,
            glibc_image(),
            &[
                "--network",
                &network.name,
                "--ip",
                ip,
                "--user",
                &user,
                "-e",
                &format!("POD_NAME={pod}"),
                "-e",
                &format!("POD_IP={ip}"),
                "-e",
                "KUBECONFIG=/etc/aistack/kubeconfig",
                "-v",
                &bind(
                    &binary("aistack-actioner"),
                    "/usr/local/bin/aistack-actioner:ro",
                ),
                "-v",
                &bind(etc.path(), "/etc/aistack:ro"),
                "-v",
                &bind(state.path(), "/state"),
            ],
            &[
                "/usr/local/bin/aistack-actioner",
                "--config.file",
                "/etc/aistack/actioner.yaml",
                "--web.listen-address",
                "0.0.0.0:9471",
                "--log.format",
                "json",
            ],
        )
    };
    let replicas = [
        ("actioner-a", format!("{prefix}.11")),
        ("actioner-b", format!("{prefix}.12")),
    ]
    .map(|(pod, ip)| (pod, replica(pod, &ip), format!("http://{ip}:9471")));
    let ready = |base: &str| aistack_tests::get_status(&format!("{base}/readyz")) == Some(200);
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        if let Some(holder) = cluster.holder() {
            break holder;
        }
        let logs: Vec<String> = replicas.iter().map(|(_, c, _)| c.logs()).collect();
        assert!(Instant::now() < deadline, "no leader; logs:\n{logs:#?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let [one, other] = replicas;
    let ((_, leader, leader_url), (_, follower, follower_url)) =
        if first.starts_with(&format!("{}_", one.0)) {
            (one, other)
        } else {
            (other, one)
        };
    wait_for(Duration::from_secs(15), "the leader ready", || {
        ready(&leader_url).then_some(())
    });
    wait_for(Duration::from_secs(15), "the follower alive", || {
        (aistack_tests::get_status(&format!("{follower_url}/healthz")) == Some(200)).then_some(())
    });
    assert!(!ready(&follower_url), "only the leader is ready");

    // Sent to the follower's address: forwarded to the leader's, answered by it.
    assert_eq!(webhook_to(&follower_url), 200);
    wait_for(Duration::from_secs(10), "the failover started", || {
        (events(&journal_at(&leader_url), "failover-when-gaming", "started") == 1).then_some(())
    });
    wait_for(Duration::from_secs(10), "vLLM told to stop", || {
        (cluster.api.deployment("ml", "vllm")["spec"]["replicas"] == 0).then_some(())
    });

    // The leader's node dies.
    let killed = Instant::now();
    docker(&["kill", &leader.id]);
    wait_for(Duration::from_secs(20), "the other replica to lead", || {
        ready(&follower_url).then_some(())
    });
    let took = killed.elapsed();
    println!(
        "ha (containers): leader killed -> the other replica ready in {:.2}s",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(15),
        "takeover in {took:?}; the follower's log:\n{}",
        follower.logs()
    );
    let entries = journal_at(&follower_url);
    assert_eq!(
        events(&entries, "failover-when-gaming", "failed"),
        1,
        "interrupted, not redone: {entries:#?}"
    );
    // Alertmanager's retry reaches the new leader: a duplicate.
    assert_eq!(webhook_to(&follower_url), 200);
    std::thread::sleep(Duration::from_secs(1));
    let entries = journal_at(&follower_url);
    assert_eq!(
        events(&entries, "failover-when-gaming", "started"),
        1,
        "{entries:#?}"
    );
    let scaled = cluster
        .api
        .patches()
        .iter()
        .filter(|p| p.path.ends_with("/vllm/scale"))
        .count();
    assert_eq!(scaled, 1, "vLLM was told to stop once");
}
