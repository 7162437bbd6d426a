//! A private D-Bus system bus (the real `dbus-daemon`) with a stand-in systemd-logind on it,
//! speaking logind's real interface names and signatures: inhibitors and sessions that tests
//! add and remove, sleep calls that are recorded instead of performed.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

use zbus::zvariant::OwnedObjectPath;

/// A `dbus-daemon` of our own on a socket in a temporary directory; killed on drop.
pub struct PrivateBus {
    child: Child,
    /// `unix:path=...` for `DBUS_SYSTEM_BUS_ADDRESS`.
    pub address: String,
    config: PathBuf,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl PrivateBus {
    /// Starts the daemon with a policy that lets anyone own and call anything.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket: PathBuf = dir.path().join("system_bus_socket");
        let config = dir.path().join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .unwrap();
        let (child, address) = Self::spawn(&config);
        Self {
            child,
            address,
            config,
            socket,
            _dir: dir,
        }
    }

    fn spawn(config: &std::path::Path) -> (Child, String) {
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--print-address"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting dbus-daemon (./tests/run installs dbus)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("unix:"), "dbus-daemon said {line:?}");
        // Without the daemon's guid, as the system bus address is written everywhere
        // (`unix:path=/run/dbus/system_bus_socket`): a client would refuse a restarted daemon.
        let address = line.trim().split(",guid=").next().unwrap().to_owned();
        (child, address)
    }

    /// Stops the bus, as if D-Bus went away.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the bus again at the same address (after [`PrivateBus::stop`]).
    pub fn start_again(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.socket);
        let (child, address) = Self::spawn(&self.config);
        assert_eq!(address, self.address);
        self.child = child;
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An inhibitor lock the stand-in reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inhibitor {
    /// `sleep`, `shutdown:sleep`, ...
    pub what: String,
    /// Holder.
    pub who: String,
    /// Reason.
    pub why: String,
    /// `block` or `delay`.
    pub mode: String,
}

/// A session the stand-in reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Session id (`3`, `c1`, ...).
    pub id: String,
    /// User name.
    pub user: String,
    /// `user`, `greeter`, ...
    pub class: String,
    /// Remote or local.
    pub remote: bool,
    /// Remote host.
    pub remote_host: String,
}

/// What the stand-in holds and what was asked of it.
#[derive(Debug, Default)]
pub struct State {
    /// Inhibitors held now.
    pub inhibitors: Vec<Inhibitor>,
    /// What `CanSuspend` and friends answer (default "yes").
    pub can_sleep: String,
    /// Calls of the sleep methods, with their `interactive` argument: `Suspend(false)`.
    pub calls: Vec<String>,
}

struct Manager {
    state: Arc<Mutex<State>>,
    sessions: Arc<Mutex<Vec<Session>>>,
}

fn session_path(id: &str) -> OwnedObjectPath {
    OwnedObjectPath::try_from(format!("/org/freedesktop/login1/session/_{id}")).unwrap()
}

impl Manager {
    fn record(&self, call: &str, interactive: bool) {
        self.state
            .lock()
            .unwrap()
            .calls
            .push(format!("{call}({interactive})"));
    }

    fn can(&self) -> String {
        self.state.lock().unwrap().can_sleep.clone()
    }
}

#[zbus::interface(name = "org.freedesktop.login1.Manager")]
impl Manager {
    fn list_inhibitors(&self) -> Vec<(String, String, String, String, u32, u32)> {
        self.state
            .lock()
            .unwrap()
            .inhibitors
            .iter()
            .map(|i| {
                (
                    i.what.clone(),
                    i.who.clone(),
                    i.why.clone(),
                    i.mode.clone(),
                    0,
                    4242,
                )
            })
            .collect()
    }

    fn list_sessions(&self) -> Vec<(String, u32, String, String, OwnedObjectPath)> {
        self.sessions
            .lock()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s.id.clone(),
                    1000,
                    s.user.clone(),
                    "seat0".to_owned(),
                    session_path(&s.id),
                )
            })
            .collect()
    }

    fn can_suspend(&self) -> String {
        self.can()
    }

    fn can_hibernate(&self) -> String {
        self.can()
    }

    fn can_hybrid_sleep(&self) -> String {
        self.can()
    }

    fn can_suspend_then_hibernate(&self) -> String {
        self.can()
    }

    fn suspend(&self, interactive: bool) {
        self.record("Suspend", interactive);
    }

    fn hibernate(&self, interactive: bool) {
        self.record("Hibernate", interactive);
    }

    fn hybrid_sleep(&self, interactive: bool) {
        self.record("HybridSleep", interactive);
    }

    fn suspend_then_hibernate(&self, interactive: bool) {
        self.record("SuspendThenHibernate", interactive);
    }
}

struct SessionObject(Session);

#[zbus::interface(name = "org.freedesktop.login1.Session")]
impl SessionObject {
    #[zbus(property)]
    fn class(&self) -> String {
        self.0.class.clone()
    }

    #[zbus(property)]
    fn remote(&self) -> bool {
        self.0.remote
    }

    #[zbus(property)]
    fn remote_host(&self) -> String {
        self.0.remote_host.clone()
    }

    #[zbus(property)]
    fn name(&self) -> String {
        self.0.user.clone()
    }
}

/// The stand-in logind on a [`PrivateBus`]. Dropping it stops both.
pub struct Login1 {
    runtime: tokio::runtime::Runtime,
    connection: zbus::Connection,
    state: Arc<Mutex<State>>,
    sessions: Arc<Mutex<Vec<Session>>>,
    /// The bus it is on.
    pub bus: PrivateBus,
}

impl Login1 {
    /// Starts a private bus and serves `org.freedesktop.login1` on it.
    pub fn start() -> Self {
        let bus = PrivateBus::start();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(Mutex::new(State {
            can_sleep: "yes".into(),
            ..State::default()
        }));
        let sessions = Arc::new(Mutex::new(Vec::new()));
        let manager = Manager {
            state: state.clone(),
            sessions: sessions.clone(),
        };
        let connection = runtime.block_on(async {
            zbus::connection::Builder::address(bus.address.as_str())?
                .name("org.freedesktop.login1")?
                .serve_at("/org/freedesktop/login1", manager)?
                .build()
                .await
        });
        Self {
            runtime,
            connection: connection.expect("serving the stand-in logind"),
            state,
            sessions,
            bus,
        }
    }

    /// Stops the bus under it, as if D-Bus went away.
    pub fn stop_bus(&mut self) {
        self.bus.stop();
    }

    /// Starts the bus again at the same address and serves logind on it as before.
    pub fn start_bus(&mut self) {
        self.bus.start_again();
        let manager = Manager {
            state: self.state.clone(),
            sessions: self.sessions.clone(),
        };
        self.connection = self
            .runtime
            .block_on(async {
                zbus::connection::Builder::address(self.bus.address.as_str())?
                    .name("org.freedesktop.login1")?
                    .serve_at("/org/freedesktop/login1", manager)?
                    .build()
                    .await
            })
            .expect("serving the stand-in logind again");
        for session in self.sessions.lock().unwrap().clone() {
            self.runtime
                .block_on(
                    self.connection
                        .object_server()
                        .at(session_path(&session.id), SessionObject(session)),
                )
                .unwrap();
        }
    }

    /// The state, to add inhibitors or read the recorded calls.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Takes an inhibitor lock, as `systemd-inhibit` would.
    pub fn inhibit(&self, what: &str, who: &str, why: &str, mode: &str) {
        self.state().inhibitors.push(Inhibitor {
            what: what.into(),
            who: who.into(),
            why: why.into(),
            mode: mode.into(),
        });
    }

    /// Releases every inhibitor held by `who`.
    pub fn release(&self, who: &str) {
        self.state().inhibitors.retain(|i| i.who != who);
    }

    /// Opens a session.
    pub fn add_session(&self, session: Session) {
        let path = session_path(&session.id);
        self.runtime
            .block_on(
                self.connection
                    .object_server()
                    .at(path, SessionObject(session.clone())),
            )
            .unwrap();
        self.sessions.lock().unwrap().push(session);
    }

    /// Closes a session.
    pub fn remove_session(&self, id: &str) {
        self.sessions.lock().unwrap().retain(|s| s.id != id);
        let _ = self.runtime.block_on(
            self.connection
                .object_server()
                .remove::<SessionObject, _>(session_path(id)),
        );
    }
}
