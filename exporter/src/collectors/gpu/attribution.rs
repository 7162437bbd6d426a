//! Who a GPU process is: its name (`/proc/<pid>/comm`), its container (the id in
//! `/proc/<pid>/cgroup`), the configured inference service it belongs to, and whether it is
//! host workload — a game or anything else that is not an inference service and holds memory.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use regex::{Regex, RegexSet};

use super::{GpuProcess, ProcessReading};
use crate::config::{HostWorkloadConfig, PodSelector, ServiceConfig, ServiceKind};

/// What /proc says about a process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessIdentity {
    /// `comm` (at most 15 characters), `None` when the pid is not visible.
    pub comm: Option<String>,
    /// Basename of argv[0].
    pub argv0: String,
    /// The command line, arguments joined by spaces.
    pub cmdline: String,
    /// 64-hex container id from the cgroup path, if the process runs in a container.
    pub container_id: Option<String>,
    /// The cgroup path is a Kubernetes pod's.
    pub in_pod: bool,
}

/// The container id in a `/proc/<pid>/cgroup` file: Docker and Podman (cgroup v1 and v2),
/// containerd and CRI-O under Kubernetes.
pub fn parse_container_id(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        path.rsplit('/').find_map(|segment| {
            let id = segment.strip_suffix(".scope").unwrap_or(segment);
            let id = ["docker-", "libpod-", "cri-containerd-", "crio-"]
                .iter()
                .find_map(|prefix| id.strip_prefix(prefix))
                .unwrap_or(id);
            (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
        })
    })
}

/// Parses `/proc/<pid>/cmdline` (NUL-separated) into (argv0 basename, joined command line).
pub fn parse_cmdline(raw: &[u8]) -> (String, String) {
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let argv0 = args
        .first()
        .map(|a| a.rsplit(['/', '\\']).next().unwrap_or(a).to_owned())
        .unwrap_or_default();
    (argv0, args.join(" "))
}

/// Reads a process's identity under `procfs`; a pid that is not visible gives an empty one.
pub fn read_identity(procfs: &Path, pid: u32) -> ProcessIdentity {
    let dir = procfs.join(pid.to_string());
    let comm = std::fs::read_to_string(dir.join("comm"))
        .ok()
        .map(|c| c.trim_end_matches('\n').to_owned());
    let (argv0, cmdline) = std::fs::read(dir.join("cmdline"))
        .map(|raw| parse_cmdline(&raw))
        .unwrap_or_default();
    let cgroup = std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
    let pod = super::pods::parse_pod(&cgroup);
    let container_id = parse_container_id(&cgroup).or_else(|| pod.as_ref()?.container_id.clone());
    ProcessIdentity {
        comm,
        argv0,
        cmdline,
        container_id,
        in_pod: pod.is_some(),
    }
}

/// Identities of the pids on the GPUs, read once per pid while it stays on a GPU.
#[derive(Debug, Default)]
pub struct IdentityCache {
    identities: HashMap<u32, ProcessIdentity>,
}

impl IdentityCache {
    /// Forgets pids no longer on a GPU and reads the new ones.
    pub fn refresh(&mut self, procfs: &Path, pids: impl IntoIterator<Item = u32>) {
        let current: HashMap<u32, ()> = pids.into_iter().map(|p| (p, ())).collect();
        self.identities.retain(|pid, _| current.contains_key(pid));
        for pid in current.into_keys() {
            self.identities
                .entry(pid)
                .or_insert_with(|| read_identity(procfs, pid));
        }
    }

    /// The identity of a pid read by the last refresh.
    pub fn get(&self, pid: u32) -> Option<&ProcessIdentity> {
        self.identities.get(&pid)
    }
}

/// What the Docker engine (or the node's pods) says about the container a GPU process runs in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerRef {
    /// Its name (in a pod: the container's name in the pod spec).
    pub name: String,
    /// It runs a known inference image and discovery is on: its processes belong to the
    /// discovered service named after it.
    pub inference: bool,
    /// In a pod: its namespace and name; empty for a Docker container.
    pub namespace: String,
    /// See `namespace`.
    pub pod: String,
    /// In a pod: the pod's labels.
    pub labels: Arc<BTreeMap<String, String>>,
}

/// How processes are attributed, compiled from the config.
#[derive(Debug)]
pub struct Attribution {
    services: Vec<ServiceMatcher>,
    workload: RegexSet,
    ignore: RegexSet,
    count_unattributed: bool,
    /// The node's pods are listed: a process in a pod they do not name is not counted.
    listing_pods: bool,
}

#[derive(Debug)]
struct ServiceMatcher {
    name: String,
    container: Option<String>,
    pods: Option<PodSelector>,
    process: Option<Regex>,
}

/// The process pattern a service of `kind` gets when the config names neither a container nor
/// a process.
pub fn default_process_pattern(kind: ServiceKind) -> Option<&'static str> {
    match kind {
        ServiceKind::Vllm => Some("(?i)vllm"),
        ServiceKind::Ollama => Some("(?i)ollama"),
        ServiceKind::Localai => Some("(?i)local-?ai"),
        ServiceKind::Openwebui | ServiceKind::Http => None,
    }
}

impl Attribution {
    /// Compiles the services and host-workload settings; the config was validated, so the
    /// patterns compile.
    pub fn new(
        services: &[ServiceConfig],
        workload: &HostWorkloadConfig,
    ) -> Result<Self, regex::Error> {
        let services = services
            .iter()
            .map(|s| {
                let named = s.container.is_some() || s.pods.is_some();
                let pattern = match &s.process {
                    Some(p) => Some(p.as_str()),
                    None if named => None,
                    None => default_process_pattern(s.kind),
                };
                Ok(ServiceMatcher {
                    name: s.name.clone(),
                    container: s.container.clone(),
                    pods: s.pods.clone(),
                    process: pattern.map(Regex::new).transpose()?,
                })
            })
            .collect::<Result<_, regex::Error>>()?;
        Ok(Self {
            services,
            workload: RegexSet::new(&workload.process_patterns)?,
            ignore: RegexSet::new(&workload.ignore_patterns)?,
            count_unattributed: workload.count_unattributed,
            listing_pods: false,
        })
    }

    /// The node's pods are listed (Kubernetes): a GPU process in a pod they do not name (not
    /// listed yet, or the API server cannot be asked) is then not counted as host workload
    /// by `count_unattributed`. Without a list, pods count as other processes do.
    #[must_use]
    pub fn listing_pods(mut self, listing: bool) -> Self {
        self.listing_pods = listing;
        self
    }

    /// Attributes one NVML process entry; `containers` looks a full container id up in the
    /// Docker engine where it can.
    pub fn attribute(
        &self,
        process: &ProcessReading,
        identity: Option<&ProcessIdentity>,
        containers: &dyn Fn(&str) -> Option<ContainerRef>,
    ) -> GpuProcess {
        let empty = ProcessIdentity::default();
        let id = identity.unwrap_or(&empty);
        let known = id.container_id.as_deref().and_then(containers);
        let unnamed_pod = self.listing_pods && id.in_pod && known.is_none();
        let known_pod = known
            .as_ref()
            .map(|k| (k.namespace.clone(), k.pod.clone()))
            .unwrap_or_default();
        let container = match (&known, id.container_id.as_deref()) {
            (Some(known), _) => known.name.clone(),
            (None, Some(full)) => full[..12].to_owned(),
            (None, None) => String::new(),
        };
        let names = [
            id.comm.as_deref().unwrap_or(""),
            id.argv0.as_str(),
            id.cmdline.as_str(),
        ];
        let service = self
            .services
            .iter()
            .find(|s| {
                let by_container = s.container.as_deref().is_some_and(|c| {
                    !container.is_empty()
                        && (c == container
                            || id
                                .container_id
                                .as_deref()
                                .is_some_and(|full| full.starts_with(c)))
                });
                let by_pod = s.pods.as_ref().is_some_and(|selector| {
                    known.as_ref().is_some_and(|k| {
                        !k.pod.is_empty() && selector.matches(&k.namespace, &k.labels)
                    })
                });
                let by_process = s
                    .process
                    .as_ref()
                    .is_some_and(|re| names.iter().any(|n| !n.is_empty() && re.is_match(n)));
                by_container || by_pod || by_process
            })
            .map(|s| s.name.clone())
            // Else a discovered service: a container of a known inference image.
            .or_else(|| known.filter(|k| k.inference).map(|k| k.name))
            .unwrap_or_default();
        let holds_memory = process.used_memory_bytes != Some(0);
        let host_workload = holds_memory
            && service.is_empty()
            && if names
                .iter()
                .any(|n| !n.is_empty() && self.workload.is_match(n))
            {
                true
            } else if names[..2]
                .iter()
                .any(|n| !n.is_empty() && self.ignore.is_match(n))
            {
                false
            } else {
                // A pod the node's pods do not name (not listed yet, or the API server cannot be
                // asked) is a Kubernetes workload all the same, not a game: counting it would
                // fail vLLM over because of vLLM itself.
                self.count_unattributed && !unnamed_pod
            };
        let (namespace, pod) = known_pod;
        GpuProcess {
            pid: process.pid,
            kind: process.kind,
            memory_bytes: process.used_memory_bytes,
            process: id.comm.clone().unwrap_or_else(|| "unknown".into()),
            container,
            service,
            host_workload,
            namespace,
            pod,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collectors::gpu::ProcessKind;

    const DOCKER_V2: &str = "0::/system.slice/docker-3f2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b.scope\n";
    const DOCKER_V1: &str = "12:pids:/docker/3f2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b\n\
        11:memory:/docker/3f2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b\n1:name=systemd:/docker/3f2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b\n";
    const K8S: &str = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5b1c.slice/cri-containerd-aa2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b.scope\n";
    const K8S_POD: &str = "0::/kubepods/burstable/pod5b1c0f7e-3333-4000-8000-000000000007/aa2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b\n";
    const HOST: &str =
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-steam.scope\n";

    #[test]
    fn container_ids_from_cgroup_paths() {
        let id = "3f2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b";
        assert_eq!(parse_container_id(DOCKER_V2).as_deref(), Some(id));
        assert_eq!(parse_container_id(DOCKER_V1).as_deref(), Some(id));
        assert_eq!(
            parse_container_id(&DOCKER_V2.replace("docker-", "libpod-")).as_deref(),
            Some(id)
        );
        assert!(parse_container_id(K8S).unwrap().starts_with("aa2b9c0d"));
        assert_eq!(parse_container_id(HOST), None);
        assert_eq!(parse_container_id(""), None);
        assert_eq!(parse_container_id("garbage"), None);
    }

    #[test]
    fn cmdline_parts() {
        assert_eq!(
            parse_cmdline(b"/usr/bin/python3\0-m\0vllm.entrypoints.openai.api_server\0"),
            (
                "python3".into(),
                "/usr/bin/python3 -m vllm.entrypoints.openai.api_server".into()
            )
        );
        assert_eq!(
            parse_cmdline(b"Z:\\games\\Cyberpunk2077.exe\0--launcher-skip\0"),
            (
                "Cyberpunk2077.exe".into(),
                "Z:\\games\\Cyberpunk2077.exe --launcher-skip".into()
            )
        );
        assert_eq!(parse_cmdline(b""), (String::new(), String::new()));
    }

    fn identity(comm: &str, cmdline: &[u8], cgroup: &str) -> ProcessIdentity {
        let (argv0, cmdline) = parse_cmdline(cmdline);
        let pod = super::super::pods::parse_pod(cgroup);
        ProcessIdentity {
            comm: Some(comm.into()),
            argv0,
            cmdline,
            container_id: parse_container_id(cgroup).or_else(|| pod.as_ref()?.container_id.clone()),
            in_pod: pod.is_some(),
        }
    }

    fn attribution(services: &str) -> Attribution {
        let services: Vec<ServiceConfig> = serde_yaml::from_str(services).unwrap();
        Attribution::new(&services, &HostWorkloadConfig::default()).unwrap()
    }

    fn no_names(_: &str) -> Option<ContainerRef> {
        None
    }

    fn process(pid: u32, memory: Option<u64>) -> ProcessReading {
        ProcessReading {
            pid,
            kind: ProcessKind::Compute,
            used_memory_bytes: memory,
        }
    }

    #[test]
    fn services_match_by_container_or_process() {
        let a = attribution(
            "- {name: vllm, kind: vllm, url: 'http://127.0.0.1:8000', container: 3f2b9c0d4e5f}\n\
             - {name: ollama, kind: ollama, url: 'http://127.0.0.1:11434'}\n",
        );
        let vllm = identity(
            "python3",
            b"python3\0-m\0vllm.entrypoints.openai.api_server\0",
            DOCKER_V2,
        );
        let p = a.attribute(&process(10, Some(1 << 30)), Some(&vllm), &no_names);
        assert_eq!(
            (p.service.as_str(), p.container.as_str(), p.host_workload),
            ("vllm", "3f2b9c0d4e5f", false)
        );

        let ollama = identity(
            "ollama",
            b"/usr/bin/ollama\0runner\0--model\0/models/blob\0",
            HOST,
        );
        let p = a.attribute(&process(11, Some(1 << 30)), Some(&ollama), &no_names);
        assert_eq!(
            (p.service.as_str(), p.container.as_str(), p.host_workload),
            ("ollama", "", false)
        );
    }

    #[test]
    fn container_names_from_the_engine_match_services() {
        let a = attribution(
            "- {name: vllm, kind: vllm, url: 'http://127.0.0.1:8000', container: vllm-server}",
        );
        let id = identity("python3", b"python3\0-m\0some.server\0", DOCKER_V2);
        let names = |full: &str| {
            full.starts_with("3f2b9c0d").then(|| ContainerRef {
                name: "vllm-server".into(),
                ..ContainerRef::default()
            })
        };
        let p = a.attribute(&process(10, Some(1)), Some(&id), &names);
        assert_eq!(
            (p.container.as_str(), p.service.as_str()),
            ("vllm-server", "vllm")
        );
        // Unresolved: the short id, and no service by name.
        let p = a.attribute(&process(10, Some(1)), Some(&id), &no_names);
        assert_eq!(
            (p.container.as_str(), p.service.as_str()),
            ("3f2b9c0d4e5f", "")
        );
    }

    #[test]
    fn containers_of_inference_images_are_discovered_services() {
        // Nothing configured: a process in a container of a known inference image belongs to
        // the service discovery names after the container; anything else is host workload.
        let a = attribution("[]");
        let id = identity("python3", b"python3\0-m\0some.server\0", DOCKER_V2);
        let engine = |inference: bool| {
            move |_: &str| {
                Some(ContainerRef {
                    name: "llm".into(),
                    inference,
                    ..ContainerRef::default()
                })
            }
        };
        let p = a.attribute(&process(10, Some(1 << 30)), Some(&id), &engine(true));
        assert_eq!(
            (p.container.as_str(), p.service.as_str(), p.host_workload),
            ("llm", "llm", false)
        );
        let p = a.attribute(&process(10, Some(1 << 30)), Some(&id), &engine(false));
        assert_eq!(
            (p.container.as_str(), p.service.as_str(), p.host_workload),
            ("llm", "", true)
        );
        // A configured service wins over discovery.
        let a =
            attribution("- {name: vllm, kind: vllm, url: 'http://127.0.0.1:8000', container: llm}");
        let p = a.attribute(&process(10, Some(1 << 30)), Some(&id), &engine(true));
        assert_eq!(p.service, "vllm");
    }

    #[test]
    fn services_name_their_pods_by_namespace_and_label_selector() {
        // A custom-built inference image discovery does not know, and a process name no
        // default pattern matches: only the selector can say it is vLLM.
        let a = attribution(
            "- {name: vllm, kind: vllm, url: 'http://vllm.ml.svc:8000', pods: {namespace: ml, selector: {app: vllm, tier: gpu}}}\n\
             - {name: batch, kind: http, url: 'http://batch.jobs.svc/healthz', pods: {namespace: jobs}}\n",
        );
        let id = identity("python3", b"python3\0serve.py\0", K8S_POD);
        let pod = |namespace: &str, labels: &[(&str, &str)]| {
            let labels: BTreeMap<String, String> = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            let labels = Arc::new(labels);
            let namespace = namespace.to_owned();
            move |_: &str| {
                Some(ContainerRef {
                    name: "server".into(),
                    namespace: namespace.clone(),
                    pod: "llm-7d4b9c-x2k4p".into(),
                    labels: labels.clone(),
                    ..ContainerRef::default()
                })
            }
        };
        let run = |names: &dyn Fn(&str) -> Option<ContainerRef>| {
            let p = a.attribute(&process(10, Some(1 << 30)), Some(&id), names);
            (p.service, p.host_workload, p.namespace)
        };
        let vllm = pod(
            "ml",
            &[
                ("app", "vllm"),
                ("tier", "gpu"),
                ("pod-template-hash", "7d4b9c"),
            ],
        );
        assert_eq!(run(&vllm), ("vllm".into(), false, "ml".into()));
        // A label short, or the same labels in another namespace: not vLLM, so host workload.
        let short = pod("ml", &[("app", "vllm")]);
        assert_eq!(run(&short), (String::new(), true, "ml".into()));
        let elsewhere = pod("dev", &[("app", "vllm"), ("tier", "gpu")]);
        assert_eq!(run(&elsewhere), (String::new(), true, "dev".into()));
        // An empty selector: every pod of its namespace.
        let job = pod("jobs", &[]);
        assert_eq!(run(&job), ("batch".into(), false, "jobs".into()));
        // Outside a pod a selector names nothing, and with `pods` no default process
        // pattern stands in for it.
        let host = identity("vllm", b"vllm\0serve\0", HOST);
        let p = a.attribute(&process(11, Some(1 << 30)), Some(&host), &no_names);
        assert_eq!((p.service.as_str(), p.host_workload), ("", true));
    }

    #[test]
    fn a_pod_the_nodes_pods_do_not_name_is_no_host_workload() {
        // count_unattributed on (as on Kubernetes), the node's pods not listed yet or the API
        // server unreachable: vLLM's own process must not read as a game.
        let services: Vec<ServiceConfig> = Vec::new();
        let workload = HostWorkloadConfig {
            count_unattributed: true,
            ..HostWorkloadConfig::default()
        };
        let unlisted = Attribution::new(&services, &workload).unwrap();
        let a = Attribution::new(&services, &workload)
            .unwrap()
            .listing_pods(true);
        let server = identity("python3", b"python3\0/app/serve.py\0", K8S_POD);
        assert!(server.in_pod);
        let p = a.attribute(&process(10, Some(1 << 30)), Some(&server), &no_names);
        assert!(!p.host_workload, "{p:?}");
        // Where the node's pods are not listed at all (no NODE_NAME, an exporter outside the
        // cluster), a pod is a process like any other.
        let p = unlisted.attribute(&process(10, Some(1 << 30)), Some(&server), &no_names);
        assert!(p.host_workload, "{p:?}");
        // A game's name still counts, in a pod or not; a host process counts unattributed.
        let game = identity("Cyberpunk2077.e", b"Z:\\Cyberpunk2077.exe\0", K8S_POD);
        assert!(
            a.attribute(&process(11, Some(1 << 30)), Some(&game), &no_names)
                .host_workload
        );
        let host = identity("python3", b"python3\0/app/serve.py\0", HOST);
        assert!(
            a.attribute(&process(12, Some(1 << 30)), Some(&host), &no_names)
                .host_workload
        );
    }

    #[test]
    fn games_count_as_host_workload_and_desktops_do_not() {
        let a = attribution("[]");
        let game = identity("Cyberpunk2077.e", b"Z:\\games\\Cyberpunk2077.exe\0", HOST);
        assert!(
            a.attribute(&process(20, Some(1 << 30)), Some(&game), &no_names)
                .host_workload
        );
        let steam = identity(
            "steamwebhelper",
            b"/home/u/.steam/ubuntu12_64/steamwebhelper\0",
            HOST,
        );
        assert!(
            a.attribute(&process(21, Some(1 << 20)), Some(&steam), &no_names)
                .host_workload
        );
        let shell = identity("gnome-shell", b"/usr/bin/gnome-shell\0", HOST);
        assert!(
            !a.attribute(&process(22, Some(1 << 28)), Some(&shell), &no_names)
                .host_workload
        );
        let bridge = identity("xwaylandvideobr", b"/usr/bin/xwaylandvideobridge\0", HOST);
        assert!(
            !a.attribute(&process(23, Some(1 << 20)), Some(&bridge), &no_names)
                .host_workload
        );
        // Unattributed, not a desktop process: counts (ffmpeg transcoding on NVENC, say) ...
        let ffmpeg = identity("ffmpeg", b"ffmpeg\0-hwaccel\0cuda\0", HOST);
        assert!(
            a.attribute(&process(24, Some(1 << 28)), Some(&ffmpeg), &no_names)
                .host_workload
        );
        // ... unless it holds no memory.
        assert!(
            !a.attribute(&process(24, Some(0)), Some(&ffmpeg), &no_names)
                .host_workload
        );
    }

    #[test]
    fn invisible_pids_are_unknown_and_still_count() {
        let a = attribution("[]");
        let p = a.attribute(&process(99, None), None, &no_names);
        assert_eq!(p.process, "unknown");
        assert!(p.host_workload, "memory unknown and not a service: counted");
    }

    #[test]
    fn only_patterns_count_when_unattributed_processes_do_not() {
        let config = HostWorkloadConfig {
            count_unattributed: false,
            ..HostWorkloadConfig::default()
        };
        let a = Attribution::new(&[], &config).unwrap();
        let ffmpeg = identity("ffmpeg", b"ffmpeg\0", HOST);
        assert!(
            !a.attribute(&process(1, Some(1)), Some(&ffmpeg), &no_names)
                .host_workload
        );
        let wine = identity("wine64-preloade", b"/usr/bin/wine64\0game.exe\0", HOST);
        assert!(
            a.attribute(&process(2, Some(1)), Some(&wine), &no_names)
                .host_workload
        );
    }

    #[test]
    fn the_cache_reads_each_pid_once_and_forgets_departed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let pid_dir = dir.path().join("42");
        std::fs::create_dir_all(&pid_dir).unwrap();
        std::fs::write(pid_dir.join("comm"), "vllm\n").unwrap();
        let mut cache = IdentityCache::default();
        cache.refresh(dir.path(), [42, 43]);
        assert_eq!(cache.get(42).unwrap().comm.as_deref(), Some("vllm"));
        assert_eq!(cache.get(43).unwrap().comm, None);
        std::fs::write(pid_dir.join("comm"), "changed\n").unwrap();
        cache.refresh(dir.path(), [42]);
        assert_eq!(
            cache.get(42).unwrap().comm.as_deref(),
            Some("vllm"),
            "cached"
        );
        assert!(cache.get(43).is_none());
    }
}
