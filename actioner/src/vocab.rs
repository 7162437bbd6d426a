//! The words the config, the rules, the policy, the journal and the actions share: which
//! actions there are, their allowlists, what a planned run is, why a run was not done, and
//! the typed values (timestamps, MAC addresses, clock stamps) entries carry. Everything here is
//! plain data; it imports nothing else of the crate but the alert's wire types.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::alert::Alert;

/// The actions the actioner can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    /// Suspend this host through systemd-logind.
    Suspend,
    /// Send a Wake-on-LAN magic packet.
    Wake,
    /// Move inference from the primary (vLLM) to the fallback (Ollama).
    Failover,
    /// Move it back.
    Failback,
    /// Restart or recreate an unhealthy container or Deployment.
    Repair,
    /// Push a notification through ntfy.
    Notify,
}

impl ActionKind {
    /// Every action.
    pub const ALL: [ActionKind; 6] = [
        Self::Suspend,
        Self::Wake,
        Self::Failover,
        Self::Failback,
        Self::Repair,
        Self::Notify,
    ];

    /// The action named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The name used in config, the API and labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Suspend => "suspend",
            Self::Wake => "wake",
            Self::Failover => "failover",
            Self::Failback => "failback",
            Self::Repair => "repair",
            Self::Notify => "notify",
        }
    }

    /// Whether a run always names a target from the action's allowlist. Failover and failback
    /// name one only where the config keeps a vLLM/Ollama pair per GPU node (see
    /// [`Allowlists::takes_target`], the one place that decides); notify goes to the
    /// configured topic.
    pub const fn takes_target(self) -> bool {
        matches!(self, Self::Suspend | Self::Wake | Self::Repair)
    }

    /// Whether runs of this action change which inference backend serves.
    pub const fn moves_backend(self) -> bool {
        matches!(self, Self::Failover | Self::Failback)
    }
}

impl fmt::Display for ActionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The targets each action may act on, from the config's allowlists. A label may select
/// among these, never add one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlists {
    /// `actions.wake.targets`.
    pub wake: BTreeSet<String>,
    /// `actions.repair.docker.containers` and `actions.repair.kubernetes.deployments`.
    pub repair: BTreeSet<String>,
    /// This host (suspend acts only for it).
    pub host: String,
    /// `actions.failover.nodes`: the GPU nodes with a vLLM/Ollama pair of their own; empty
    /// when one pair serves the cluster (failover and failback then take no target).
    pub failover: BTreeSet<String>,
}

impl Allowlists {
    /// The allowlist of `action`; `None` for actions without targets.
    pub fn of(&self, action: ActionKind) -> Option<BTreeSet<String>> {
        match action {
            ActionKind::Wake => Some(self.wake.clone()),
            ActionKind::Repair => Some(self.repair.clone()),
            ActionKind::Suspend => Some(BTreeSet::from([self.host.clone()])),
            ActionKind::Failover | ActionKind::Failback if self.per_node_pairs() => {
                Some(self.failover.clone())
            }
            ActionKind::Failover | ActionKind::Failback | ActionKind::Notify => None,
        }
    }

    /// Whether a run of `action` names a target: always for suspend, wake and repair; for
    /// failover and failback where each GPU node has its own pair (the node is the target).
    pub fn takes_target(&self, action: ActionKind) -> bool {
        action.takes_target() || (action.moves_backend() && self.per_node_pairs())
    }

    /// Whether each GPU node has a vLLM/Ollama pair of its own.
    pub fn per_node_pairs(&self) -> bool {
        !self.failover.is_empty()
    }

    /// The configured node (a key of `actions.failover.nodes`) that `name` spells: the same
    /// IP address however written (`fd00::7`, `fd00:0::7`), or the same host name in any case
    /// and with or without its trailing dot (`GPU-B.` is `gpu-b`).
    fn failover_node(&self, name: &str) -> Option<&String> {
        self.failover
            .iter()
            .find(|node| aistack_common::node::same(node, name))
    }

    /// `target` of `action` as the config spells it: a failover's or failback's node spelt
    /// otherwise becomes the configured one; anything else stays as it is.
    pub fn as_configured(&self, action: ActionKind, target: String) -> String {
        match self.failover_node(&target) {
            Some(node) if action.moves_backend() => node.clone(),
            _ => target,
        }
    }

    /// Whether the config has the pair `pair`: "" (one pair for the cluster) without
    /// `actions.failover.nodes`, else one of its nodes.
    pub fn has_pair(&self, pair: &str) -> bool {
        if self.per_node_pairs() {
            self.failover.contains(pair)
        } else {
            pair.is_empty()
        }
    }

    /// Whether `action` may act on `target`.
    pub fn allows(&self, action: ActionKind, target: &str) -> bool {
        match action {
            ActionKind::Wake => self.wake.contains(target),
            ActionKind::Repair => self.repair.contains(target),
            ActionKind::Suspend => target == self.host,
            ActionKind::Failover | ActionKind::Failback => self.failover.contains(target),
            ActionKind::Notify => false,
        }
    }
}

/// Which inference backend serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// vLLM.
    #[default]
    Primary,
    /// Ollama.
    Fallback,
}

impl Backend {
    /// The name in the API and the `backend` label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Fallback => "fallback",
        }
    }
}

/// A wall-clock instant, written as RFC 3339 with milliseconds (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub SystemTime);

impl Timestamp {
    /// Now, to the millisecond: what the journal writes is what the ledger holds.
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let millis = Duration::from_millis(u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
        Self(SystemTime::UNIX_EPOCH + millis)
    }

    /// Time from this instant to `now` (zero when the clock went back).
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.0).unwrap_or(Duration::ZERO)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_millis(self.0))
    }
}

impl FromStr for Timestamp {
    type Err = humantime::TimestampError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_rfc3339_weak(s).map(Self)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where the host stood in its own awake time when a run started: its boot and
/// CLOCK_MONOTONIC, which stands still while the host sleeps. Lets a restarted actioner tell
/// how long the host has been awake since it last asked for a suspend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwakeStamp {
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// CLOCK_MONOTONIC in milliseconds.
    pub monotonic_ms: u64,
}

impl AwakeStamp {
    /// This host, now.
    pub fn now() -> Self {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        Self {
            boot_id,
            monotonic_ms: u64::try_from(awake().as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Awake time from this stamp to `now`; `None` when `now` is another boot (a reboot ends
    /// every grace).
    pub fn awake_since(&self, now: &AwakeStamp) -> Option<Duration> {
        (self.boot_id == now.boot_id && !self.boot_id.is_empty())
            .then(|| Duration::from_millis(now.monotonic_ms.saturating_sub(self.monotonic_ms)))
    }
}

/// CLOCK_MONOTONIC: time awake since boot.
fn awake() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// A MAC address in any common notation: `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff`,
/// `aabb.ccdd.eeff` or `aabbccddeeff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

/// Why a MAC address did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC {0:?}")]
pub struct InvalidMac(pub String);

impl FromStr for MacAddress {
    type Err = InvalidMac;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidMac(s.to_owned());
        let t = s.trim();
        let hex: String = if t.len() == 17 {
            let sep = if t.contains(':') { ':' } else { '-' };
            let parts: Vec<&str> = t.split(sep).collect();
            if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
                return Err(invalid());
            }
            parts.concat()
        } else if t.len() == 14 {
            let parts: Vec<&str> = t.split('.').collect();
            if parts.len() != 3 || parts.iter().any(|p| p.len() != 4) {
                return Err(invalid());
            }
            parts.concat()
        } else if t.len() == 12 {
            t.to_owned()
        } else {
            return Err(invalid());
        };
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        let mut bytes = [0u8; 6];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| invalid())?;
        }
        Ok(Self(bytes))
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for MacAddress {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddress {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a run is, as the journal keys it: one key runs at most once when it is once-only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunKey(pub String);

impl RunKey {
    /// A rule's run for one alert firing and status: `rule|fingerprint|startsAt|status`.
    pub fn firing(rule: &str, alert: &Alert) -> Self {
        Self(format!(
            "{rule}|{}|{}|{}",
            alert.fingerprint,
            alert.starts_at,
            alert.status.as_str()
        ))
    }

    /// A notification button's press: `button:<action>:<target>:<fingerprint>@<startsAt>`.
    pub fn button(action: ActionKind, target: Option<&str>, firing: &str) -> Self {
        Self(format!(
            "button:{}:{}:{firing}",
            action.name(),
            target.unwrap_or_default()
        ))
    }

    /// A manual trigger or relayed wake: `manual:<time>:<n>`, unique per process.
    pub fn manual(at: Timestamp, n: u64) -> Self {
        Self(format!("manual:{at}:{n}"))
    }

    /// Whether a second run with this key is refused: alert firings and buttons. Manual runs
    /// never repeat, so they do not take room in the once-only set.
    pub fn is_once_only(&self) -> bool {
        !self.0.starts_with("manual:")
    }

    /// The key as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for RunKey {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for RunKey {
    fn from(key: &str) -> Self {
        Self(key.to_owned())
    }
}

impl fmt::Display for RunKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who wants a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A rule, for an alert.
    Rule,
    /// `POST /api/v1/actions/{action}`.
    Api,
    /// `POST /api/v1/wake`.
    Relay,
    /// A notification button.
    Button,
}

impl Origin {
    /// The journal's `rule` for runs a person asked for (`manual:api`, ...).
    pub const fn manual_rule(self) -> &'static str {
        match self {
            Self::Rule => "",
            Self::Api => "manual:api",
            Self::Relay => "manual:wake-relay",
            Self::Button => "manual:button",
        }
    }
}

/// What a run will do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The rule's name, or `manual:<source>`.
    pub rule: String,
    /// The action.
    pub action: ActionKind,
    /// The allowlisted target, for actions that take one (`None` for a relayed raw MAC).
    pub target: Option<String>,
    /// Plan and journal only.
    pub dry_run: bool,
    /// The rule's cooldown, for runs a rule plans.
    pub cooldown: Option<Duration>,
    /// Who wants it.
    pub origin: Origin,
}

/// The journal's tag for why a run was not done, or how it failed: a stable snake_case word
/// that replay reads; the entry's `detail` is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Suspend, for an alert about another host (or none).
    NotThisHost,
    /// The target is not in the action's allowlist.
    NotAllowlisted,
    /// The action needs a target and none was given.
    NoTarget,
    /// This firing already ran (or runs) this rule: a re-send, an HA duplicate.
    Duplicate,
    /// A button pressed again.
    AlreadyDone,
    /// A button whose alert has resolved since.
    Resolved,
    /// Automatic actions are paused.
    Paused,
    /// The rule (or action) ran on this target too recently.
    Cooldown,
    /// The action queue is full.
    Overloaded,
    /// Repairs of this target reached `max_attempts` within `window`.
    Exhausted,
    /// A dry run: planned and journaled, not acted on.
    DryRun,
    /// Re-checked at action time, the condition no longer holds.
    ConditionGone,
    /// The actioner stopped while the run was planned or running; not retried.
    Interrupted,
    /// The run took longer than its action's timeout.
    TimedOut,
    /// The action is not available in this config.
    Unavailable,
    /// The action was tried and failed.
    Error,
}

impl Reason {
    /// Whether this refusal repeats a run that goes on (it does not end that run).
    pub const fn is_repeat(self) -> bool {
        matches!(self, Self::Duplicate | Self::AlreadyDone)
    }
}

/// Why a run was not done, with its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// Suspend, for an alert about another host (or none).
    NotThisHost(Option<String>),
    /// The target asked for is not in the action's allowlist.
    NotAllowlisted(ActionKind, String),
    /// The action needs a target and none was given.
    NoTarget(ActionKind),
    /// This firing already ran this rule.
    Duplicate,
    /// A button pressed again.
    AlreadyDone,
    /// A button whose alert has resolved since.
    Resolved,
    /// Automatic actions are paused.
    Paused,
    /// Ran on this target too recently: this much is left.
    Cooldown(Duration),
    /// The action queue is full (the webhook is answered 503 and retried).
    Overloaded,
    /// `attempts` repairs of this target within `window`: a person is needed.
    Exhausted {
        /// Repairs counted.
        attempts: u32,
        /// The window they were counted in.
        window: Duration,
    },
    /// A dry run, and what it would have done.
    DryRun(String),
    /// The condition no longer holds, and why.
    ConditionGone(String),
}

impl Skip {
    /// The journal's tag.
    pub const fn reason(&self) -> Reason {
        match self {
            Self::NotThisHost(_) => Reason::NotThisHost,
            Self::NotAllowlisted(..) => Reason::NotAllowlisted,
            Self::NoTarget(_) => Reason::NoTarget,
            Self::Duplicate => Reason::Duplicate,
            Self::AlreadyDone => Reason::AlreadyDone,
            Self::Resolved => Reason::Resolved,
            Self::Paused => Reason::Paused,
            Self::Cooldown(_) => Reason::Cooldown,
            Self::Overloaded => Reason::Overloaded,
            Self::Exhausted { .. } => Reason::Exhausted,
            Self::DryRun(_) => Reason::DryRun,
            Self::ConditionGone(_) => Reason::ConditionGone,
        }
    }
}

/// `text` cut to at most `max` bytes at a character boundary.
pub fn cut_bytes(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Longest label-derived text put into a message, in characters.
const MAX_QUOTED: usize = 128;

fn quoted(text: &str) -> String {
    let cut: String = text.chars().take(MAX_QUOTED).collect();
    if cut.len() < text.len() {
        format!("{cut:?}...")
    } else {
        format!("{cut:?}")
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotThisHost(Some(host)) => {
                let cut: String = host.chars().take(MAX_QUOTED).collect();
                write!(f, "not this host: the alert is about {cut}")
            }
            Self::NotThisHost(None) => write!(f, "not this host: the alert names no host"),
            Self::NotAllowlisted(action, target) => {
                write!(f, "{} is not in the {action} allowlist", quoted(target))
            }
            Self::NoTarget(action) => write!(f, "the {action} action needs a target"),
            Self::Duplicate => write!(f, "duplicate: this firing already ran this rule"),
            Self::AlreadyDone => write!(f, "already done: this button was pressed before"),
            Self::Resolved => write!(f, "resolved: the alert this button was for has resolved"),
            Self::Paused => f.write_str("paused"),
            Self::Cooldown(left) => write!(f, "cooldown: {}s left", left.as_secs().max(1)),
            Self::Overloaded => write!(f, "overloaded: action queue full"),
            Self::Exhausted { attempts, window } => write!(
                f,
                "repairs exhausted: {attempts} in the last {}s; a person is needed",
                window.as_secs()
            ),
            Self::DryRun(what) => write!(f, "dry-run: {what}"),
            Self::ConditionGone(why) => write!(f, "condition no longer true: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_notations() {
        let want = MacAddress([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f]);
        for s in [
            "aa:bb:cc:dd:ee:0f",
            "AA-BB-CC-DD-EE-0F",
            "aabb.ccdd.ee0f",
            "aabbccddee0f",
        ] {
            assert_eq!(s.parse::<MacAddress>(), Ok(want), "{s}");
        }
        assert_eq!(want.to_string(), "aa:bb:cc:dd:ee:0f");
        for s in [
            "zz:bb:cc:dd:ee:ff",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "aabbccddeeff00",
            "aa:bbb:cc:dd:e:ff",
            "+a:bb:cc:dd:ee:ff",
            "aa:bb-cc:dd:ee:ff",
            "é€é€é€é€é€é",
            "",
        ] {
            assert!(s.parse::<MacAddress>().is_err(), "{s}");
        }
    }

    #[test]
    fn timestamps_round_trip_in_milliseconds() {
        let t: Timestamp = "2026-11-22T23:08:09.405Z".parse().unwrap();
        assert_eq!(t.to_string(), "2026-11-22T23:08:09.405Z");
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
        assert!(serde_json::from_str::<Timestamp>("\"yesterday\"").is_err());
    }

    #[test]
    fn awake_time_counts_only_within_one_boot() {
        let then = AwakeStamp {
            boot_id: "b1".into(),
            monotonic_ms: 1_000,
        };
        let later = AwakeStamp {
            boot_id: "b1".into(),
            monotonic_ms: 61_000,
        };
        assert_eq!(then.awake_since(&later), Some(Duration::from_secs(60)));
        let rebooted = AwakeStamp {
            boot_id: "b2".into(),
            ..later
        };
        assert_eq!(then.awake_since(&rebooted), None);
        let now = AwakeStamp::now();
        assert!(!now.boot_id.is_empty(), "the test host has a boot id");
    }

    #[test]
    fn quoted_targets_are_cut() {
        let long = "x".repeat(10_000);
        let text = Skip::NotAllowlisted(ActionKind::Repair, long).to_string();
        assert!(text.len() < 200, "{}", text.len());
    }
}
