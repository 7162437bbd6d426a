//! Failover, failback and repair on `platform: kubernetes`: the real actioner binary, with
//! kube's client reading a kubeconfig, against a stand-in API server (tests/src/kubernetes.rs)
//! that keeps Deployments and a Service and moves their status as a controller would; vLLM,
//! Ollama and the exporter are loopback stand-ins. Every request the actioner sends must be
//! one the Role in k8s/base/rbac.yaml allows.

use std::process::Command;
use std::time::{Duration, Instant};

use aistack_tests::kubernetes::{FakeKubernetes, Pods, Recorded};
use aistack_tests::stub::{StubServer, gpu_report};
use aistack_tests::{
    Daemon, Network, binary, copy_tree, fake_gpu_exporter, fake_gpu_exporter_container, fixtures,
    get, get_with_token, post_json, wait_for, workspace_root,
};
use serde_json::json;

const TOKEN: &str = "0123456789abcdef";

struct Setup {
    api: FakeKubernetes,
    exporter: StubServer,
    actioner: Daemon,
    _dir: tempfile::TempDir,
}

/// The actioner with the shipped k8s names (namespace ml; vllm, ollama, Service inference).
fn start(api: FakeKubernetes, kubeconfig: &std::path::Path) -> Setup {
    start_with(api, kubeconfig, "20s")
}

fn start_with(api: FakeKubernetes, kubeconfig: &std::path::Path, fallback_timeout: &str) -> Setup {
    start_full(api, kubeconfig, fallback_timeout, None, "")
}

/// [`start_with`], with `exporter_url` set (else the stand-in exporter's URL) and `extra`
/// top-level config lines.
fn start_full(
    api: FakeKubernetes,
    kubeconfig: &std::path::Path,
    fallback_timeout: &str,
    exporter_url: Option<&str>,
    extra: &str,
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let vllm = StubServer::start();
    vllm.set("/health", 200, "");
    let ollama = StubServer::start();
    ollama.set("/api/tags", 200, r#"{"models":[]}"#);
    let exporter = StubServer::start();
    exporter.set("/api/v1/gpu", 200, &gpu_report(false));
    aistack_tests::write_secret(dir.path().join("token"), TOKEN);
    let config = dir.path().join("actioner.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
host: gpu-box
state_dir: {state}
exporter_url: {exporter}
auth: {{bearer_token_file: {token}}}
{extra}
rules:
  - {{name: failover-when-gaming, match: {{alertname: AistackGpuHostWorkload}}, on: firing, action: failover}}
  - {{name: failback, match: {{alertname: AistackGpuHostWorkload}}, on: resolved, action: failback}}
actions:
  failover:
    platform: kubernetes
    kubernetes: {{namespace: ml, primary: vllm, fallback: ollama, service: inference}}
    primary_health_url: "{vllm}/health"
    fallback_health_url: "{ollama}/api/tags"
    fallback_timeout: {fallback_timeout}
    primary_timeout: 4s
  repair:
    kubernetes: {{deployments: [ml/ollama, ml/vllm]}}
    healthy_timeout: 4s
"#,
            state = dir.path().join("state").display(),
            exporter = exporter_url.unwrap_or(&exporter.url),
            token = dir.path().join("token").display(),
            vllm = vllm.url,
            ollama = ollama.url,
        ),
    )
    .unwrap();
    let mut command = Command::new(binary("aistack-actioner"));
    command
        .env("KUBECONFIG", kubeconfig)
        .env("HOME", dir.path())
        .env_remove("KUBERNETES_SERVICE_HOST");
    let actioner = Daemon::start_with(command, &["--config.file", config.to_str().unwrap()]);
    Setup {
        api,
        exporter,
        actioner,
        _dir: dir,
    }
}

/// [`start_full`] in [`ml_mode`], with `exporter_url: http://{node}:PORT` (the exporters of
/// the nodes 127.0.0.x on `port`) and `extra` config lines.
fn start_on_nodes(port: u16, extra: &str) -> Setup {
    let api = ml_mode();
    let kubeconfig = api.kubeconfig.clone();
    let pattern = format!("http://{{node}}:{port}");
    start_full(api, &kubeconfig, "20s", Some(&pattern), extra)
}

/// vLLM serving with 2 replicas behind the Service; Ollama scaled to 0.
fn ml_mode() -> FakeKubernetes {
    let api = FakeKubernetes::start();
    // vLLM's pods take 1.5 s to shut down (their grace period).
    api.add_deployment(
        "ml",
        "vllm",
        2,
        &[("app", "vllm"), ("tier", "gpu")],
        Pods {
            ready_after: Duration::from_millis(1500),
            ..Pods::default()
        },
    );
    api.add_deployment("ml", "ollama", 0, &[("app", "ollama")], Pods::default());
    api.add_service("ml", "inference", &[("app", "vllm"), ("tier", "gpu")]);
    api
}

fn trigger(setup: &Setup, action: &str, body: &str) -> serde_json::Value {
    let reply = post_json(
        &setup.actioner.url(&format!("/api/v1/actions/{action}")),
        Some(TOKEN),
        body,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_str(&reply.body).unwrap()
}

fn webhook(setup: &Setup, status: &str, ends_at: &str) {
    webhook_from(setup, status, ends_at, "gpu-box:9470");
}

/// [`webhook`] about the node at `instance`.
fn webhook_from(setup: &Setup, status: &str, ends_at: &str, instance: &str) {
    webhook_about(setup, status, ends_at, instance, "4f1c9b5a0e2d7c36");
}

/// [`webhook_from`], the alert's fingerprint `fingerprint` (one per node's alert).
fn webhook_about(setup: &Setup, status: &str, ends_at: &str, instance: &str, fingerprint: &str) {
    let body = json!({
        "version": "4", "status": status, "receiver": "aistack-actioner",
        "groupLabels": {"alertname": "AistackGpuHostWorkload"}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093", "groupKey": "{}:{alertname=\"AistackGpuHostWorkload\"}",
        "truncatedAlerts": 0,
        "alerts": [{
            "status": status,
            "labels": {"alertname": "AistackGpuHostWorkload", "severity": "info", "instance": instance, "gpu": "0"},
            "annotations": {"summary": format!("Someone else is using GPU 0 on {instance}")},
            "startsAt": "2026-11-22T22:00:00Z", "endsAt": ends_at,
            "generatorURL": "http://prometheus:9090/graph", "fingerprint": fingerprint
        }]
    });
    let reply = post_json(
        &setup.actioner.url("/api/v1/alerts"),
        Some(TOKEN),
        &body.to_string(),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
}

fn journal(setup: &Setup) -> Vec<serde_json::Value> {
    serde_json::from_str(
        &get_with_token(&setup.actioner.url("/api/v1/actions?limit=200"), TOKEN).body,
    )
    .unwrap()
}

fn wait_for_end(setup: &Setup, rule: &str) -> serde_json::Value {
    wait_for(Duration::from_secs(30), &format!("{rule} to end"), || {
        journal(setup).into_iter().find(|e| {
            e["rule"] == rule
                && ["succeeded", "failed", "skipped"].contains(&e["event"].as_str().unwrap_or(""))
        })
    })
}

/// The Role k8s/base/rbac.yaml ships, as (namespace, apiGroup, resource, name, verb) grants.
fn shipped_grants() -> Vec<(String, String, String, String, String)> {
    let text = std::fs::read_to_string(workspace_root().join("k8s/base/rbac.yaml")).unwrap();
    let mut grants = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let object: serde_yaml::Value = serde::Deserialize::deserialize(document).unwrap();
        if object["kind"] != "Role" {
            continue;
        }
        let namespace = object["metadata"]["namespace"].as_str().unwrap().to_owned();
        for rule in object["rules"].as_sequence().unwrap() {
            let strings = |key: &str| -> Vec<String> {
                rule[key]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
                    .collect()
            };
            for group in strings("apiGroups") {
                for resource in strings("resources") {
                    for name in strings("resourceNames") {
                        for verb in strings("verbs") {
                            grants.push((
                                namespace.clone(),
                                group.clone(),
                                resource.clone(),
                                name.clone(),
                                verb,
                            ));
                        }
                    }
                }
            }
        }
    }
    grants
}

/// Each request maps to a grant of the shipped Role; merge patches only.
fn assert_allowed_by_the_shipped_role(requests: &[Recorded]) {
    assert!(!requests.is_empty());
    let grants = shipped_grants();
    for request in requests {
        let parts: Vec<&str> = request.path.trim_start_matches('/').split('/').collect();
        let (group, rest) = match parts.as_slice() {
            ["apis", group, _version, rest @ ..] => ((*group).to_owned(), rest),
            ["api", _version, rest @ ..] => (String::new(), rest),
            _ => panic!("unexpected path {}", request.path),
        };
        let (namespace, resource, name) = match rest {
            ["namespaces", ns, resource, name] => (*ns, (*resource).to_owned(), *name),
            ["namespaces", ns, resource, name, sub] => (*ns, format!("{resource}/{sub}"), *name),
            _ => panic!("unexpected path {}", request.path),
        };
        let verb = match request.method.as_str() {
            "GET" => "get",
            "PATCH" => "patch",
            other => panic!("unexpected method {other} {}", request.path),
        };
        let allowed = grants.iter().any(|(ns, g, r, n, v)| {
            ns == namespace && *g == group && *r == resource && n == name && v == verb
        });
        assert!(
            allowed,
            "{verb} {resource} {namespace}/{name} is not in k8s/base/rbac.yaml"
        );
        if verb == "patch" {
            assert_eq!(request.content_type, "application/merge-patch+json");
        }
    }
}

#[test]
fn failover_frees_the_gpu_and_failback_restores_vllm_through_the_api_server() {
    let api = ml_mode();
    let kubeconfig = api.kubeconfig.clone();
    let setup = start(api, &kubeconfig);

    // A game starts: the alert fires.
    let fired = Instant::now();
    webhook(&setup, "firing", "0001-01-01T00:00:00Z");
    let end = wait_for_end(&setup, "failover-when-gaming");
    let took = fired.elapsed();
    assert_eq!(end["event"], "succeeded", "{end}");
    let vllm = setup.api.deployment("ml", "vllm");
    assert_eq!(vllm["spec"]["replicas"], 0);
    assert_eq!(
        vllm["status"].get("replicas"),
        None,
        "no vLLM pod left: {vllm}"
    );
    assert_eq!(
        vllm["metadata"]["annotations"]["aistack.io/replicas-before-failover"],
        "2"
    );
    let ollama = setup.api.deployment("ml", "ollama");
    assert_eq!(ollama["spec"]["replicas"], 1);
    assert_eq!(ollama["status"]["availableReplicas"], 1);
    assert_eq!(
        setup.api.selector("ml", "inference"),
        json!({"app": "ollama"}),
        "the Service selects Ollama's pods and nothing of vLLM's"
    );
    // Ollama was scaled up only once vLLM's pods had finished shutting down.
    let patches = setup.api.patches();
    let at = |path: &str| {
        patches
            .iter()
            .find(|p| p.path.ends_with(path))
            .unwrap_or_else(|| panic!("no patch of {path}"))
            .at
    };
    let gap = at("/ollama/scale") - at("/vllm/scale");
    assert!(
        gap >= Duration::from_millis(1400),
        "Ollama started {gap:?} after vLLM was told to stop"
    );
    println!(
        "failover on kubernetes: alert to VRAM freed and Ollama serving in {:.2}s (stand-in vLLM pods stop in 1.5s, Ollama's start in 0.3s)",
        took.as_secs_f64()
    );
    let state: serde_json::Value =
        serde_json::from_str(&get_with_token(&setup.actioner.url("/api/v1/state"), TOKEN).body)
            .unwrap();
    assert_eq!(state["inference_backend"], "fallback");

    // Again: nothing to change, nothing patched.
    let patches = setup.api.patches().len();
    let again = trigger(&setup, "failover", "{}");
    assert_eq!(again["status"], "succeeded", "{again}");
    assert!(
        again["detail"]
            .as_str()
            .unwrap()
            .starts_with("already on the fallback"),
        "{again}"
    );
    assert_eq!(setup.api.patches().len(), patches);

    // The game still holds the GPU: failback waits for the next resolution.
    setup.exporter.set("/api/v1/gpu", 200, &gpu_report(true));
    let early = trigger(&setup, "failback", "{}");
    assert_eq!(early["status"], "skipped", "{early}");
    assert_eq!(setup.api.deployment("ml", "vllm")["spec"]["replicas"], 0);

    // The game ends: the alert resolves, vLLM comes back with its replicas, then the Service.
    setup.exporter.set("/api/v1/gpu", 200, &gpu_report(false));
    let resolved = Instant::now();
    webhook(&setup, "resolved", "2026-11-22T23:00:00Z");
    let end = wait_for_end(&setup, "failback");
    assert_eq!(end["event"], "succeeded", "{end}");
    println!(
        "failback on kubernetes: resolution to vLLM serving in {:.2}s (stand-in vLLM pods start in 1.5s)",
        resolved.elapsed().as_secs_f64()
    );
    let vllm = setup.api.deployment("ml", "vllm");
    assert_eq!(vllm["spec"]["replicas"], 2);
    assert_eq!(vllm["status"]["availableReplicas"], 2);
    assert_eq!(
        vllm["metadata"]["annotations"].get("aistack.io/replicas-before-failover"),
        None
    );
    assert_eq!(
        setup.api.selector("ml", "inference"),
        json!({"app": "vllm", "tier": "gpu"})
    );
    let again = trigger(&setup, "failback", "{}");
    assert!(
        again["detail"]
            .as_str()
            .unwrap()
            .starts_with("already on the primary"),
        "{again}"
    );
    assert_allowed_by_the_shipped_role(&setup.api.requests());
}

/// Two GPU nodes, A (127.0.0.1) and B (127.0.0.2), each with its exporter on one port, and
/// `exporter_url: http://{node}:PORT`. A game on B fails over from B's alert; failback re-checks
/// B's exporter — never A's: while B's game runs, failback refuses even though A is free; once
/// it ends, B's resolution fails back though A now has a game of its own (A's alert, not B's,
/// is for that).
#[test]
fn a_game_on_node_b_fails_over_and_back_by_bs_own_gpu() {
    let (nodes, port) = StubServer::start_on_nodes(&["127.0.0.1", "127.0.0.2"]);
    let (a, b) = (&nodes[0], &nodes[1]);
    a.set("/api/v1/gpu", 200, &gpu_report(false));
    b.set("/api/v1/gpu", 200, &gpu_report(true));
    let setup = start_on_nodes(port, "");
    let b_instance = format!("127.0.0.2:{port}");

    webhook_from(&setup, "firing", "0001-01-01T00:00:00Z", &b_instance);
    let end = wait_for_end(&setup, "failover-when-gaming");
    assert_eq!(end["event"], "succeeded", "{end}");

    // B's game runs on; a person asks to fail back for B: B's exporter says no.
    let early = trigger(&setup, "failback", r#"{"node": "127.0.0.2"}"#);
    assert_eq!(early["status"], "skipped", "{early}");
    assert!(
        early["detail"].as_str().unwrap().contains("host workload"),
        "{early}"
    );
    // Naming no node, with a pattern: never guessed; the run fails (and would page).
    let unnamed = trigger(&setup, "failback", "{}");
    assert_eq!(unnamed["status"], "failed", "{unnamed}");
    assert!(
        unnamed["detail"].as_str().unwrap().contains("names none"),
        "{unnamed}"
    );
    assert_eq!(a.hits("/api/v1/gpu"), 0, "A was never asked about B's game");
    assert_eq!(setup.api.deployment("ml", "vllm")["spec"]["replicas"], 0);

    // B's game ends and A starts one: B's resolution fails back by B's GPU.
    b.set("/api/v1/gpu", 200, &gpu_report(false));
    a.set("/api/v1/gpu", 200, &gpu_report(true));
    webhook_from(&setup, "resolved", "2026-11-22T23:00:00Z", &b_instance);
    let end = wait_for_end(&setup, "failback");
    assert_eq!(end["event"], "succeeded", "{end}");
    assert_eq!(setup.api.deployment("ml", "vllm")["spec"]["replicas"], 2);
    assert_eq!(a.hits("/api/v1/gpu"), 0);
    assert!(b.hits("/api/v1/gpu") >= 2);

    // "node" is for failback, with a pattern, and a host name or address only.
    for (action, body) in [
        ("failover", r#"{"node": "127.0.0.2"}"#),
        ("failback", r#"{"node": "evil.example/x?"}"#),
        ("failback", r#"{"node": "012.1.1.1"}"#),
    ] {
        let reply = post_json(
            &setup.actioner.url(&format!("/api/v1/actions/{action}")),
            Some(TOKEN),
            body,
        );
        assert_eq!(reply.status, 400, "{action} {body}: {}", reply.body);
    }
}

/// One vLLM/Ollama pair for the cluster, `gpu_nodes: [A, B]`: games on both nodes; A's ends
/// and resolves, but B still has one, so failback stays refused (vLLM could land on B); once
/// B's ends too, its resolution fails back.
#[test]
fn with_gpu_nodes_failback_waits_until_no_node_has_a_game() {
    let (nodes, port) = StubServer::start_on_nodes(&["127.0.0.1", "127.0.0.2"]);
    let (a, b) = (&nodes[0], &nodes[1]);
    a.set("/api/v1/gpu", 200, &gpu_report(true));
    b.set("/api/v1/gpu", 200, &gpu_report(true));
    let setup = start_on_nodes(port, "gpu_nodes: [127.0.0.1, 127.0.0.2]");
    let a_instance = format!("127.0.0.1:{port}");
    webhook_from(&setup, "firing", "0001-01-01T00:00:00Z", &a_instance);
    let end = wait_for_end(&setup, "failover-when-gaming");
    assert_eq!(end["event"], "succeeded", "{end}");

    // A's game ends; B's goes on: A's resolution may not bring vLLM back.
    a.set("/api/v1/gpu", 200, &gpu_report(false));
    webhook_from(&setup, "resolved", "2026-11-22T23:00:00Z", &a_instance);
    let end = wait_for_end(&setup, "failback");
    assert_eq!(end["event"], "skipped", "{end}");
    let detail = end["detail"].as_str().unwrap();
    assert!(
        detail.contains("host workload") && detail.contains("127.0.0.2"),
        "{end}"
    );
    assert_eq!(setup.api.deployment("ml", "vllm")["spec"]["replicas"], 0);

    // B's ends: its failback, asked by hand for B, finds every node free.
    b.set("/api/v1/gpu", 200, &gpu_report(false));
    let done = trigger(&setup, "failback", r#"{"node": "127.0.0.2"}"#);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(setup.api.deployment("ml", "vllm")["spec"]["replicas"], 2);
}

/// One node's real exporter (the stand-in NVML answering for its GPU, its own procfs): on a
/// loopback address, or in a container of its own address; `game` puts a game
/// (`Cyberpunk2077.exe`, pid 4242, 6 GiB) on its GPU.
struct Node {
    dir: tempfile::TempDir,
    /// Its exporter's base URL.
    url: String,
    /// Its address, as alerts name the node.
    address: String,
    _exporter: Box<dyn std::any::Any>,
}

impl Node {
    fn prepare(game: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(&fixtures().join("roots/t0"), dir.path());
        let proc = dir.path().join("proc/4242");
        std::fs::create_dir_all(&proc).unwrap();
        std::fs::write(proc.join("comm"), "Cyberpunk2077.e\n").unwrap();
        std::fs::write(proc.join("cmdline"), "Z:\\Cyberpunk2077.exe\0").unwrap();
        std::fs::write(
            proc.join("cgroup"),
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-steam.scope\n",
        )
        .unwrap();
        Self::set_game(dir.path(), game);
        dir
    }

    /// On `address` (a loopback address and port).
    fn start(address: &str, game: bool) -> Self {
        let dir = Self::prepare(game);
        let exporter = fake_gpu_exporter(dir.path(), "", "", address, &[]);
        Self {
            url: exporter.url(""),
            address: address.rsplit_once(':').unwrap().0.to_owned(),
            dir,
            _exporter: Box::new(exporter),
        }
    }

    /// In a container `name` of `network`, on port 9470 of its address.
    fn in_container(network: &Network, name: &str, game: bool) -> Self {
        let dir = Self::prepare(game);
        let (container, address) = fake_gpu_exporter_container(network, name, dir.path(), "");
        Self {
            url: format!("http://{address}:9470"),
            address,
            dir,
            _exporter: Box::new(container),
        }
    }

    fn set_game(dir: &std::path::Path, game: bool) {
        let path = dir.join("scenario.json");
        let mut scenario: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("gpu/rtx-4080-super.json")).unwrap(),
        )
        .unwrap();
        scenario["devices"][0]["processes"] = if game {
            json!([{"pid": 4242, "name": "Cyberpunk2077.exe", "kind": "graphics", "used_memory_bytes": 6_442_450_944_u64}])
        } else {
            json!([])
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, scenario.to_string()).unwrap();
        std::fs::rename(tmp, path).unwrap();
    }

    /// Whether its GPU API says a game holds the GPU (waiting for it to say `want`).
    fn wait_gaming(&self, want: bool) {
        wait_for(Duration::from_secs(20), "the GPU API", || {
            let report: serde_json::Value =
                serde_json::from_str(&get(&format!("{}/api/v1/gpu", self.url)).body).ok()?;
            (report["gpus"][0]["host_workload_active"] == want).then_some(())
        });
    }

    fn game(&self, on: bool) {
        Self::set_game(self.dir.path(), on);
        self.wait_gaming(on);
    }
}

/// The same with the real exporter binaries on two "nodes" (127.0.0.1 and 127.0.0.2, one
/// port): a game on node B fails over from B's alert and fails back by B's own GPU, while node
/// A — where the actioner would have asked before — has a game of its own at the end.
#[test]
fn two_real_exporters_a_game_on_node_b_is_handled_by_bs_gpu() {
    let port = (0..50)
        .find_map(|_| {
            let first = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
            let port = first.local_addr().ok()?.port();
            std::net::TcpListener::bind(("127.0.0.2", port)).ok()?;
            Some(port)
        })
        .expect("a port free on both addresses");
    let a = Node::start(&format!("127.0.0.1:{port}"), false);
    let b = Node::start(&format!("127.0.0.2:{port}"), true);
    a.wait_gaming(false);
    b.wait_gaming(true);
    let setup = start_on_nodes(port, "");
    let b_instance = format!("127.0.0.2:{port}");

    webhook_from(&setup, "firing", "0001-01-01T00:00:00Z", &b_instance);
    assert_eq!(
        wait_for_end(&setup, "failover-when-gaming")["event"],
        "succeeded"
    );
    let early = trigger(&setup, "failback", r#"{"node": "127.0.0.2"}"#);
    assert_eq!(early["status"], "skipped", "{early}");
    assert!(
        early["detail"].as_str().unwrap().contains("Cyberpunk"),
        "{early}"
    );

    b.game(false);
    a.game(true);
    webhook_from(&setup, "resolved", "2026-11-22T23:00:00Z", &b_instance);
    let end = wait_for_end(&setup, "failback");
    assert_eq!(end["event"], "succeeded", "{end}");
    assert_eq!(setup.api.deployment("ml", "vllm")["spec"]["replicas"], 2);
}

/// A vLLM/Ollama pair per GPU node (`actions.failover.nodes`), the nodes containers of their
/// own address on a Docker network, each with the real exporter (the stand-in NVML for its
/// GPU): Deployments `vllm-N`/`ollama-N` and Service `inference-N` per node. A game on B fails
/// over B's pair only; A's game later fails over A's; B's resolution fails B's pair back by
/// B's GPU while A's game goes on, and A's pair stays on its fallback. The state API and
/// `/metrics` show each node's backend.
#[test]
fn with_a_pair_per_gpu_node_each_node_fails_over_and_back_on_its_own() {
    let network = Network::create("gpu-nodes");
    let nodes = [
        Node::in_container(&network, "gpu-a", false),
        Node::in_container(&network, "gpu-b", true),
    ];
    nodes[0].wait_gaming(false);
    nodes[1].wait_gaming(true);
    let api = FakeKubernetes::start();
    let dir = tempfile::tempdir().unwrap();
    let mut pairs = String::new();
    let mut health = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let vllm = format!("vllm-{i}");
        let pods = Pods {
            ready_after: Duration::from_millis(500),
            ..Pods::default()
        };
        api.add_deployment("ml", &vllm, 1, &[("app", &vllm)], pods);
        let ollama = format!("ollama-{i}");
        api.add_deployment("ml", &ollama, 0, &[("app", &ollama)], Pods::default());
        api.add_service("ml", &format!("inference-{i}"), &[("app", &vllm)]);
        let (v, o) = (StubServer::start(), StubServer::start());
        v.set("/health", 200, "");
        o.set("/api/tags", 200, r#"{"models":[]}"#);
        pairs.push_str(&format!(
            "      \"{node}\":\n        kubernetes: {{namespace: ml, primary: {vllm}, fallback: {ollama}, service: inference-{i}}}\n        primary_health_url: \"{v}/health\"\n        fallback_health_url: \"{o}/api/tags\"\n",
            node = node.address,
            v = v.url,
            o = o.url,
        ));
        health.push((v, o));
    }
    aistack_tests::write_secret(dir.path().join("token"), TOKEN);
    let config = dir.path().join("actioner.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
state_dir: {state}
exporter_url: "http://{{node}}:9470"
auth: {{bearer_token_file: {token}}}
rules:
  - {{name: failover-when-gaming, match: {{alertname: AistackGpuHostWorkload}}, on: firing, action: failover}}
  - {{name: failback, match: {{alertname: AistackGpuHostWorkload}}, on: resolved, action: failback}}
actions:
  failover:
    platform: kubernetes
    fallback_timeout: 20s
    primary_timeout: 10s
    nodes:
{pairs}"#,
            state = dir.path().join("state").display(),
            token = dir.path().join("token").display(),
        ),
    )
    .unwrap();
    let (check, _, stderr) = aistack_tests::run(
        "aistack-actioner",
        &["check-config", "--config.file", config.to_str().unwrap()],
    );
    assert_eq!(check, 0, "{stderr}");
    let mut command = Command::new(binary("aistack-actioner"));
    command
        .env("KUBECONFIG", &api.kubeconfig)
        .env("HOME", dir.path())
        .env_remove("KUBERNETES_SERVICE_HOST");
    let actioner = Daemon::start_with(command, &["--config.file", config.to_str().unwrap()]);
    let setup = Setup {
        api,
        exporter: StubServer::start(),
        actioner,
        _dir: dir,
    };
    let (a, b) = (&nodes[0], &nodes[1]);
    let instance = |node: &Node| format!("{}:9470", node.address);
    let ended = |rule: &str, node: &Node| {
        wait_for(
            Duration::from_secs(30),
            &format!("{rule} on {}", node.address),
            || {
                journal(&setup).into_iter().find(|e| {
                    e["rule"] == rule
                        && e["target"] == node.address.as_str()
                        && ["succeeded", "failed", "skipped"]
                            .contains(&e["event"].as_str().unwrap_or(""))
                })
            },
        )
    };
    // Node i's pair: vLLM's replicas, and whose pods the clients' Service selects.
    let pair = |i: usize| {
        let vllm = setup.api.deployment("ml", &format!("vllm-{i}"));
        let service = setup.api.selector("ml", &format!("inference-{i}"));
        (vllm["spec"]["replicas"].clone(), service["app"].clone())
    };
    let state = || -> serde_json::Value {
        serde_json::from_str(&get_with_token(&setup.actioner.url("/api/v1/state"), TOKEN).body)
            .unwrap()
    };

    // B's game: B's pair fails over; A's is not touched.
    webhook_about(
        &setup,
        "firing",
        "0001-01-01T00:00:00Z",
        &instance(b),
        "b0b0b0b0b0b0b0b0",
    );
    let end = ended("failover-when-gaming", b);
    assert_eq!(end["event"], "succeeded", "{end}");
    assert_eq!(pair(1), (json!(0), json!("ollama-1")));
    assert_eq!(pair(0), (json!(1), json!("vllm-0")), "A's pair is not B's");
    let now = state();
    assert_eq!(
        now["nodes"][&b.address]["inference_backend"], "fallback",
        "{now}"
    );
    assert_eq!(
        now["nodes"][&a.address]["inference_backend"], "primary",
        "{now}"
    );
    assert_eq!(now["inference_backend"], "fallback", "{now}");
    let metrics = setup.actioner.get("/metrics").body;
    for (node, backend, value) in [(b, "fallback", 1), (a, "primary", 1), (a, "fallback", 0)] {
        let line = format!(
            "aistack_actioner_inference_backend{{node=\"{}\",backend=\"{backend}\"}} {value}",
            node.address
        );
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }

    // A has a game too: its own alert fails its own pair over.
    a.game(true);
    webhook_about(
        &setup,
        "firing",
        "0001-01-01T00:00:00Z",
        &instance(a),
        "a0a0a0a0a0a0a0a0",
    );
    let end = ended("failover-when-gaming", a);
    assert_eq!(end["event"], "succeeded", "{end}");
    assert_eq!(pair(0), (json!(0), json!("ollama-0")));

    // A person asks to fail B back while B's game runs: B's own exporter says no.
    let body = format!(r#"{{"target": "{}"}}"#, b.address);
    let early = trigger(&setup, "failback", &body);
    assert_eq!(early["status"], "skipped", "{early}");
    assert!(
        early["detail"].as_str().unwrap().contains("Cyberpunk"),
        "{early}"
    );

    // B's game ends, A's goes on: B's resolution brings B's vLLM back by B's GPU alone.
    b.game(false);
    webhook_about(
        &setup,
        "resolved",
        "2026-11-22T23:00:00Z",
        &instance(b),
        "b0b0b0b0b0b0b0b0",
    );
    let end = ended("failback", b);
    assert_eq!(end["event"], "succeeded", "{end}");
    assert_eq!(pair(1), (json!(1), json!("vllm-1")));
    assert_eq!(
        pair(0),
        (json!(0), json!("ollama-0")),
        "A's pair stays on its fallback"
    );
    let now = state();
    assert_eq!(
        now["nodes"][&b.address]["inference_backend"], "primary",
        "{now}"
    );
    assert_eq!(
        now["nodes"][&a.address]["inference_backend"], "fallback",
        "{now}"
    );

    // With a pair per node, the target names the node: no "node", no run without a target,
    // no node without a pair.
    for body in [
        format!(r#"{{"target": "{}", "node": "{}"}}"#, a.address, a.address),
        "{}".to_owned(),
        r#"{"target": "gpu-c"}"#.to_owned(),
    ] {
        let reply = post_json(
            &setup.actioner.url("/api/v1/actions/failback"),
            Some(TOKEN),
            &body,
        );
        assert_eq!(reply.status, 400, "{body}: {}", reply.body);
    }
    drop(health);
}

#[test]
fn failback_stays_on_the_fallback_when_vllm_does_not_come_up() {
    let api = FakeKubernetes::start();
    let broken = Pods {
        never_ready: true,
        ..Pods::default()
    };
    api.add_deployment("ml", "vllm", 0, &[("app", "vllm")], broken);
    api.add_deployment("ml", "ollama", 1, &[("app", "ollama")], Pods::default());
    api.add_service("ml", "inference", &[("app", "ollama")]);
    let kubeconfig = api.kubeconfig.clone();
    let setup = start(api, &kubeconfig);

    let run = trigger(&setup, "failback", "{}");
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["detail"]
            .as_str()
            .unwrap()
            .starts_with("staying on the fallback"),
        "{run}"
    );
    // Scaled up, never ready, scaled back to 0 so it holds no VRAM; the Service never moved.
    let scales: Vec<serde_json::Value> = setup
        .api
        .patches()
        .iter()
        .filter(|p| p.path.ends_with("/vllm/scale"))
        .map(|p| p.body["spec"]["replicas"].clone())
        .collect();
    assert_eq!(scales, [json!(1), json!(0)]);
    assert_eq!(
        setup.api.selector("ml", "inference"),
        json!({"app": "ollama"})
    );
    assert_allowed_by_the_shipped_role(&setup.api.requests());
}

#[test]
fn a_fallback_that_does_not_come_up_still_gets_the_service() {
    let api = FakeKubernetes::start();
    api.add_deployment("ml", "vllm", 1, &[("app", "vllm")], Pods::default());
    let broken = Pods {
        never_ready: true,
        ..Pods::default()
    };
    api.add_deployment("ml", "ollama", 0, &[("app", "ollama")], broken);
    api.add_service("ml", "inference", &[("app", "vllm")]);
    let kubeconfig = api.kubeconfig.clone();
    let setup = start_with(api, &kubeconfig, "3s");
    let run = trigger(&setup, "failover", "{}");
    assert_eq!(run["status"], "failed", "{run}");
    let detail = run["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("vllm scaled to 0, but ollama has no ready replica")
            && detail.ends_with("; Service inference on ollama"),
        "{detail}"
    );
    assert_eq!(
        setup.api.selector("ml", "inference"),
        json!({"app": "ollama"})
    );
    assert_allowed_by_the_shipped_role(&setup.api.requests());
}

#[test]
fn repair_is_a_rollout_restart_of_a_deployment_short_of_ready_pods() {
    let api = FakeKubernetes::start();
    let wedged = Pods {
        never_ready: true,
        fixed_by_restart: true,
        ..Pods::default()
    };
    api.add_deployment("ml", "ollama", 1, &[("app", "ollama")], wedged);
    api.add_deployment("ml", "vllm", 0, &[("app", "vllm")], Pods::default());
    api.add_service("ml", "inference", &[("app", "vllm")]);
    let kubeconfig = api.kubeconfig.clone();
    let setup = start(api, &kubeconfig);

    let run = trigger(&setup, "repair", r#"{"target":"ml/ollama"}"#);
    assert_eq!(run["status"], "succeeded", "{run}");
    let detail = run["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("rollout restart of ml/ollama: 0/1 available before, 1/1 available"),
        "{detail}"
    );
    let ollama = setup.api.deployment("ml", "ollama");
    assert!(
        ollama["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"]
            .is_string(),
        "{ollama}"
    );

    // Healthy now: left alone. Scaled to 0 by a person: left alone. Not listed: refused.
    let healthy = trigger(&setup, "repair", r#"{"target":"ml/ollama"}"#);
    assert_eq!(healthy["status"], "skipped", "{healthy}");
    assert!(healthy["detail"].as_str().unwrap().contains("healthy now"));
    let stopped = trigger(&setup, "repair", r#"{"target":"ml/vllm"}"#);
    assert_eq!(stopped["status"], "skipped", "{stopped}");
    assert!(
        stopped["detail"]
            .as_str()
            .unwrap()
            .contains("stopped on purpose")
    );
    let reply = post_json(
        &setup.actioner.url("/api/v1/actions/repair"),
        Some(TOKEN),
        r#"{"target":"ml/other"}"#,
    );
    assert_eq!(reply.status, 400, "{}", reply.body);

    // Wedged for good: the restart does not help, and the run says how far it got.
    setup.api.set_pods(
        "ml",
        "ollama",
        Pods {
            never_ready: true,
            ..Pods::default()
        },
    );
    wait_for(Duration::from_secs(5), "ollama to be unavailable", || {
        (setup.api.deployment("ml", "ollama")["status"]
            .get("availableReplicas")
            .is_none())
        .then_some(())
    });
    let failed = trigger(&setup, "repair", r#"{"target":"ml/ollama"}"#);
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["detail"]
            .as_str()
            .unwrap()
            .contains("did not finish: Deployment ml/ollama not there within 4s: 0/1 available"),
        "{failed}"
    );
    assert_allowed_by_the_shipped_role(&setup.api.requests());
}

#[test]
fn without_a_cluster_the_run_fails_and_says_why() {
    let api = ml_mode();
    let setup = start(api, std::path::Path::new("/nonexistent/kubeconfig"));
    let run = trigger(&setup, "failover", "{}");
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["detail"]
            .as_str()
            .unwrap()
            .starts_with("no Kubernetes API"),
        "{run}"
    );
    assert!(setup.api.requests().is_empty());
    // The actioner serves on.
    assert_eq!(setup.actioner.get("/healthz").status, 200);
}
