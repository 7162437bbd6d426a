//! `idle`: runs the [`IdleEngine`](crate::idle::IdleEngine) every interval on the latest CPU,
//! GPU and logind samples plus the configured gates, and publishes its verdict — for
//! `aistack_idle_*` and `GET /api/v1/idle` — with `aistack_host_suspended_seconds_total`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aistack_common::api::IdleReport;
use procfs_core::net::{InterfaceDeviceStatus, TcpNetEntries, TcpState};
use procfs_core::{FromRead, FromReadSI, LoadAverage, ProcResult};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use regex::RegexSet;

use super::cpu::CpuSample;
use super::gpu::GpuSample;
use super::logind::LogindSample;
use super::wol::physical_interfaces;
use super::{Collector, CollectorError, EncodeSample, Latest, blocking, system_info};
use crate::idle::{Gate, GateKind, IdleConfig, IdleEngine, IdleState, Observation, Verdict};
use crate::metrics::{counter, gauge, gauge_family};

/// Reads CLOCK_MONOTONIC and CLOCK_BOOTTIME.
pub fn clocks() -> (Duration, Duration) {
    use rustix::time::{ClockId, clock_gettime};
    let read = |id| {
        let t = clock_gettime(id);
        Duration::new(
            t.tv_sec.max(0) as u64,
            t.tv_nsec.clamp(0, 999_999_999) as u32,
        )
    };
    (read(ClockId::Monotonic), read(ClockId::Boottime))
}

/// The 1-minute load average from /proc/loadavg: a finite, non-negative number or nothing.
///
/// procfs-core parses it as an `f32`, and a float parser takes more than /proc ever says:
/// `inf`, `NaN`, and `2e850000`, which overflows to infinity. The kernel prints two decimals,
/// which an `f32` does not hold (0.52 is 0.51999998): the value is rounded back to them.
pub fn parse_loadavg(text: &str) -> Option<f64> {
    let load = LoadAverage::from_read(text.as_bytes()).ok()?;
    let one = f64::from(load.one);
    (one.is_finite() && one >= 0.0).then(|| (one * 100.0).round() / 100.0)
}

/// Established connections whose local port is in `ports`, from /proc/net/tcp or tcp6; only
/// ports with at least one.
pub fn established_on(text: &str, ports: &[u16]) -> ProcResult<Vec<(u16, usize)>> {
    let entries = TcpNetEntries::from_read(text.as_bytes(), &system_info())?;
    let mut counts: Vec<(u16, usize)> = ports.iter().map(|p| (*p, 0)).collect();
    for entry in entries.0 {
        if entry.state != TcpState::Established {
            continue;
        }
        let port = entry.local_address.port();
        if let Some(count) = counts.iter_mut().find(|(p, _)| *p == port) {
            count.1 += 1;
        }
    }
    counts.retain(|(_, n)| *n > 0);
    Ok(counts)
}

/// Received plus sent bytes of `interfaces`, from /proc/net/dev.
pub fn net_dev_bytes(text: &str, interfaces: &[String]) -> ProcResult<u64> {
    let devices = InterfaceDeviceStatus::from_read(text.as_bytes())?;
    Ok(interfaces
        .iter()
        .filter_map(|name| devices.0.get(name))
        .map(|d| d.recv_bytes.saturating_add(d.sent_bytes))
        .fold(0, u64::saturating_add))
}

/// Reads `file` under `procfs`; `None` when it is not there (or not readable).
fn read(procfs: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(procfs.join(file)).ok()
}

/// Logs a file that did not parse (at debug: the gate it feeds is then off, nothing more).
fn parsed<T>(file: &str, result: ProcResult<T>) -> Option<T> {
    result
        .inspect_err(|err| tracing::debug!(collector = "idle", file, %err, "cannot parse"))
        .ok()
}

/// What the procfs-based gates read in one go (on the blocking pool).
#[derive(Debug, Default)]
struct HostReadings {
    load: Option<f64>,
    connections: Vec<(u16, usize)>,
    processes: Vec<(u32, String)>,
    network_bytes: Option<u64>,
}

fn read_host(
    procfs: &Path,
    sysfs: &Path,
    config: &IdleConfig,
    patterns: Option<&RegexSet>,
) -> HostReadings {
    let gates = &config.gates;
    let mut readings = HostReadings::default();
    if gates.load_above.is_some() {
        readings.load = read(procfs, "loadavg").as_deref().and_then(parse_loadavg);
    }
    if !gates.connection_ports.is_empty() {
        for file in ["net/tcp", "net/tcp6"] {
            let Some(text) = read(procfs, file) else {
                continue;
            };
            let found = parsed(file, established_on(&text, &gates.connection_ports));
            for (port, n) in found.unwrap_or_default() {
                match readings.connections.iter_mut().find(|(p, _)| *p == port) {
                    Some(entry) => entry.1 += n,
                    None => readings.connections.push((port, n)),
                }
            }
        }
    }
    if let Some(patterns) = patterns {
        for entry in std::fs::read_dir(procfs).into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) {
                let comm = comm.trim_end().to_owned();
                if patterns.is_match(&comm) {
                    readings.processes.push((pid, comm));
                }
            }
        }
    }
    if gates.network_bytes_per_second > 0 {
        let interfaces = physical_interfaces(sysfs).unwrap_or_default();
        readings.network_bytes = read(procfs, "net/dev")
            .and_then(|text| parsed("net/dev", net_dev_bytes(&text, &interfaces)));
    }
    readings
}

/// One `idle` sample: the engine's verdict and the time spent suspended.
#[derive(Debug, Clone, PartialEq)]
pub struct IdleSample {
    /// The verdict.
    pub verdict: Verdict,
    /// CLOCK_BOOTTIME minus CLOCK_MONOTONIC: time suspended since boot.
    pub suspended: Duration,
}

impl IdleSample {
    /// The API's view.
    pub fn report(&self) -> IdleReport {
        let v = &self.verdict;
        let round = |x: f64| (x * 10.0).round() / 10.0;
        IdleReport {
            state: v.state,
            idle_for_s: v.idle_for.as_secs(),
            threshold_s: v.threshold.as_secs(),
            cpu_idle_pct: v.cpu_idle_pct.map(round),
            gpu_idle_pct: v.gpu_idle_pct.map(round),
            suspend_ready: v.suspend_ready,
            gating_reasons: v.gates.iter().map(ToString::to_string).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

impl EncodeSample for IdleSample {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let v = &self.verdict;
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        gauge_family(
            encoder,
            "idle_state",
            "1 for the idle engine's current state, 0 for the others.",
            None,
            IdleState::ALL.map(|s| (StateLabel { state: s.as_str() }, flag(v.state == s))),
        )?;
        gauge(
            encoder,
            "idle",
            "How long the host has been idle (0 unless idle).",
            Some("seconds"),
            v.idle_for.as_secs_f64(),
        )?;
        gauge(
            encoder,
            "idle_threshold",
            "Idle time after which the host is ready to suspend (idle.idle_timeout_seconds).",
            Some("seconds"),
            v.threshold.as_secs_f64(),
        )?;
        gauge(
            encoder,
            "idle_suspend_ready",
            "1 when the host has been idle for the threshold and no gate blocks suspending.",
            None,
            flag(v.suspend_ready),
        )?;
        gauge_family(
            encoder,
            "idle_gate_blocking",
            "1 for each kind of gate that blocks suspending now.",
            None,
            GateKind::ALL.map(|k| {
                (
                    ReasonLabel { reason: k.as_str() },
                    flag(v.gates.iter().any(|g| g.kind == k)),
                )
            }),
        )?;
        counter(
            encoder,
            "host_suspended",
            "Time this host spent suspended since boot (CLOCK_BOOTTIME - CLOCK_MONOTONIC).",
            Some("seconds"),
            self.suspended.as_secs_f64(),
        )
    }
}

/// Feeds the idle engine.
pub struct IdleCollector {
    engine: IdleEngine,
    config: IdleConfig,
    procfs: PathBuf,
    sysfs: PathBuf,
    patterns: Option<RegexSet>,
    cpu: Latest<CpuSample>,
    gpu: Latest<GpuSample>,
    logind: Latest<LogindSample>,
    last_network: Option<(Instant, u64)>,
}

impl fmt::Debug for IdleCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdleCollector")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl IdleCollector {
    /// Reads the other collectors' channels; gate files under `procfs` and `sysfs`.
    pub fn new(
        config: IdleConfig,
        procfs: PathBuf,
        sysfs: PathBuf,
        cpu: Latest<CpuSample>,
        gpu: Latest<GpuSample>,
        logind: Latest<LogindSample>,
    ) -> Result<Self, regex::Error> {
        let patterns = (!config.gates.processes.is_empty())
            .then(|| RegexSet::new(&config.gates.processes))
            .transpose()?;
        Ok(Self {
            engine: IdleEngine::new(config.clone()),
            config,
            procfs,
            sysfs,
            patterns,
            cpu,
            gpu,
            logind,
            last_network: None,
        })
    }

    /// The gates that block now, from the latest samples and the host readings.
    fn gates(&mut self, host: &HostReadings, now: Instant) -> Vec<Gate> {
        let gates = &self.config.gates;
        let mut blocking = Vec::new();
        if let Some(logind) = self.logind.borrow().sample.clone() {
            for i in logind.inhibitors.iter().filter(|i| i.blocks_sleep()) {
                blocking.push(Gate {
                    kind: GateKind::Inhibitor,
                    detail: format!("inhibitor: {} ({})", i.who, i.why),
                });
            }
            if gates.remote_sessions {
                for s in logind
                    .sessions
                    .iter()
                    .filter(|s| s.remote && s.class == "user")
                {
                    let from = if s.remote_host.is_empty() {
                        String::new()
                    } else {
                        format!(" from {}", s.remote_host)
                    };
                    blocking.push(Gate {
                        kind: GateKind::RemoteSession,
                        detail: format!("remote session: {}{from}", s.user),
                    });
                }
            }
        }
        if gates.service_busy
            && let Some(gpu) = self.gpu.borrow().sample.clone()
        {
            for device in &gpu.devices {
                let Some(utilization) = device.utilization() else {
                    continue;
                };
                if utilization < self.config.gpu_idle_threshold {
                    continue;
                }
                let mut services: Vec<&str> = device
                    .processes
                    .iter()
                    .map(|p| p.service.as_str())
                    .filter(|s| !s.is_empty())
                    .collect();
                services.dedup();
                for service in services {
                    blocking.push(Gate {
                        kind: GateKind::ServiceBusy,
                        detail: format!(
                            "service {service} busy on GPU {} ({:.0} %)",
                            device.reading.index,
                            utilization * 100.0
                        ),
                    });
                }
            }
        }
        if let (Some(limit), Some(load)) = (gates.load_above, host.load)
            && load > limit
        {
            blocking.push(Gate {
                kind: GateKind::Load,
                detail: format!("load {load:.2} above {limit}"),
            });
        }
        for (port, n) in &host.connections {
            blocking.push(Gate {
                kind: GateKind::Connections,
                detail: format!("{n} connection(s) on port {port}"),
            });
        }
        for (pid, name) in &host.processes {
            blocking.push(Gate {
                kind: GateKind::Process,
                detail: format!("process {name} (pid {pid})"),
            });
        }
        if let Some(bytes) = host.network_bytes {
            if let Some((at, before)) = self.last_network {
                let seconds = now.saturating_duration_since(at).as_secs_f64();
                let rate = if seconds > 0.0 {
                    bytes.saturating_sub(before) as f64 / seconds
                } else {
                    0.0
                };
                if rate > gates.network_bytes_per_second as f64 {
                    blocking.push(Gate {
                        kind: GateKind::Network,
                        detail: format!("network {:.1} MiB/s", rate / f64::from(1 << 20)),
                    });
                }
            }
            self.last_network = Some((now, bytes));
        }
        blocking
    }
}

impl Collector for IdleCollector {
    type Sample = IdleSample;

    async fn sample(&mut self, now: Instant) -> Result<IdleSample, CollectorError> {
        let (procfs, sysfs, config, patterns) = (
            self.procfs.clone(),
            self.sysfs.clone(),
            self.config.clone(),
            self.patterns.clone(),
        );
        let host =
            blocking(move || Ok(read_host(&procfs, &sysfs, &config, patterns.as_ref()))).await?;
        let gates = self.gates(&host, now);
        let cpu = self
            .cpu
            .borrow()
            .sample
            .as_ref()
            .and_then(|s| s.utilization);
        let gpu = self.gpu.borrow().sample.as_ref().and_then(|s| {
            s.devices
                .iter()
                .filter_map(|d| d.utilization())
                .reduce(f64::max)
        });
        let (monotonic, boottime) = clocks();
        let verdict = self.engine.observe(Observation {
            monotonic,
            boottime,
            cpu,
            gpu,
            gates,
        });
        if verdict.resumed {
            tracing::info!(
                collector = "idle",
                "host resumed from suspend; idle engine warming up again"
            );
        }
        Ok(IdleSample {
            verdict,
            suspended: boottime.saturating_sub(monotonic),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 20183 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:2516 0100007F:B31A 01 00000000:00000000 00:00000000 00000000     0        0 99931 1 0000000000000000 20 4 30 10 -1\n\
   2: 0A00020F:0016 0A000201:D5A2 01 00000000:00000000 02:000A7B1D 00000000     0        0 41882 2 0000000000000000 20 4 31 10 -1\n\
   3: 0A00020F:0016 0A000201:D5A4 01 00000000:00000000 02:000A7B1D 00000000     0        0 41883 2 0000000000000000 20 4 31 10 -1\n";

    fn fixture(file: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/roots/t0/proc")
            .join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn established_connections_by_local_port() {
        // Port 22 (0x16): one listening socket (0A) and two established (01); 9494 (0x2516): one.
        assert_eq!(
            established_on(TCP, &[22, 9494, 445]).unwrap(),
            [(22, 2), (9494, 1)]
        );
        assert!(established_on(TCP, &[]).unwrap().is_empty());
        // Only the header: no connection at all.
        let header = TCP.lines().next().unwrap();
        assert!(established_on(header, &[22]).unwrap().is_empty());
        assert!(established_on("garbage\nmore garbage here x y\n", &[22]).is_err());
    }

    #[test]
    fn established_connections_in_captured_tables() {
        // Two SSH clients on 127.0.0.1:22 (their own ends, local port 0x9DC8 and 0x9DD0, are
        // not the server's), and Ollama's port 11434 on [::] reached over ::1 and over IPv4
        // (a v4-mapped address in tcp6); the IPv4 client's end is in tcp.
        let (tcp, tcp6) = (fixture("net/tcp"), fixture("net/tcp6"));
        assert_eq!(established_on(&tcp, &[22, 11434]).unwrap(), [(22, 2)]);
        assert_eq!(established_on(&tcp6, &[22, 11434]).unwrap(), [(11434, 2)]);
        assert!(
            established_on(&tcp, &[2024]).unwrap().is_empty(),
            "listening only"
        );
    }

    #[test]
    fn loadavg() {
        assert_eq!(parse_loadavg("0.52 0.58 0.59 1/467 123456\n"), Some(0.52));
        assert_eq!(
            parse_loadavg("123.45 0.58 0.59 1/467 123456\n"),
            Some(123.45)
        );
        assert_eq!(parse_loadavg(&fixture("loadavg")), Some(0.51));
        assert_eq!(parse_loadavg(""), None);
        assert_eq!(parse_loadavg("0.52"), None, "five fields or nothing");
        // Found by the fuzz pass: a float parser takes more than /proc ever says.
        for junk in ["2e850000", "inf", "NaN", "-1.5", "-inf"] {
            let line = format!("{junk} 0.58 0.59 1/467 123456\n");
            assert_eq!(parse_loadavg(&line), None, "{line}");
        }
    }

    #[test]
    fn net_dev() {
        let dev = "Inter-|   Receive                                                |  Transmit\n\
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n\
    lo: 1000  10 0 0 0 0 0 0 1000 10 0 0 0 0 0 0\n\
  eth0: 5000000 4000 0 0 0 0 0 0 250000 2000 0 0 0 0 0 0\n\
docker0: 77 1 0 0 0 0 0 0 88 1 0 0 0 0 0 0\n";
        assert_eq!(net_dev_bytes(dev, &["eth0".to_owned()]).unwrap(), 5_250_000);
        assert_eq!(net_dev_bytes(dev, &[]).unwrap(), 0);
        assert_eq!(net_dev_bytes(dev, &["wlan0".to_owned()]).unwrap(), 0);
        let captured = fixture("net/dev");
        let names = |list: &[&str]| list.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            net_dev_bytes(&captured, &names(&["eth0"])).unwrap(),
            133_337_742 + 382_434
        );
        assert_eq!(
            net_dev_bytes(&captured, &names(&["eth0", "docker0", "ifb0"])).unwrap(),
            133_337_742 + 382_434 + 1626
        );
        // Counters near the top add up without overflowing.
        let huge = dev.replace("5000000", &u64::MAX.to_string());
        assert_eq!(
            net_dev_bytes(&huge, &["eth0".to_owned()]).unwrap(),
            u64::MAX
        );
        assert!(net_dev_bytes(&format!("{dev}  eth1: 12 x\n"), &[]).is_err());
    }
}
