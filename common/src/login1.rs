//! systemd-logind's D-Bus API (`org.freedesktop.login1`), the parts aistack uses: inhibitors and
//! sessions (the exporter's idle gates), and the sleep calls (the actioner's suspend action).
//!
//! Connect with [`system_bus`], which honours `DBUS_SYSTEM_BUS_ADDRESS` as zbus does.

use zbus::zvariant::OwnedObjectPath;

/// Connects to the system bus (`DBUS_SYSTEM_BUS_ADDRESS`, else the well-known socket).
pub async fn system_bus() -> zbus::Result<zbus::Connection> {
    zbus::Connection::system().await
}

/// Whether an inhibitor stops the host from sleeping: a `block` lock whose colon-separated
/// `what` includes `sleep`.
pub fn blocks_sleep(what: &str, mode: &str) -> bool {
    mode == "block" && what.split(':').any(|w| w == "sleep")
}

/// One inhibitor lock as `ListInhibitors` reports it: (what, who, why, mode, uid, pid).
pub type InhibitorEntry = (String, String, String, String, u32, u32);

/// One session as `ListSessions` reports it: (id, uid, user, seat, object path).
pub type SessionEntry = (String, u32, String, String, OwnedObjectPath);

/// `org.freedesktop.login1.Manager` on `/org/freedesktop/login1`.
#[zbus::proxy(
    interface = "org.freedesktop.login1.Manager",
    default_service = "org.freedesktop.login1",
    default_path = "/org/freedesktop/login1",
    gen_blocking = false
)]
pub trait Manager {
    /// Every inhibitor lock held now.
    fn list_inhibitors(&self) -> zbus::Result<Vec<InhibitorEntry>>;

    /// Every session.
    fn list_sessions(&self) -> zbus::Result<Vec<SessionEntry>>;

    /// "yes", "no", "challenge" or "na".
    fn can_suspend(&self) -> zbus::Result<String>;

    /// As `can_suspend`, for hibernation.
    fn can_hibernate(&self) -> zbus::Result<String>;

    /// As `can_suspend`, for hybrid sleep.
    fn can_hybrid_sleep(&self) -> zbus::Result<String>;

    /// As `can_suspend`, for suspend-then-hibernate.
    fn can_suspend_then_hibernate(&self) -> zbus::Result<String>;

    /// Suspends the host; `interactive` false never asks for a password.
    fn suspend(&self, interactive: bool) -> zbus::Result<()>;

    /// Hibernates the host.
    fn hibernate(&self, interactive: bool) -> zbus::Result<()>;

    /// Hybrid sleep.
    fn hybrid_sleep(&self, interactive: bool) -> zbus::Result<()>;

    /// Suspend, then hibernate after a delay.
    fn suspend_then_hibernate(&self, interactive: bool) -> zbus::Result<()>;
}

/// `org.freedesktop.login1.Session` on a session's object path.
#[zbus::proxy(
    interface = "org.freedesktop.login1.Session",
    default_service = "org.freedesktop.login1",
    gen_blocking = false
)]
pub trait Session {
    /// `user`, `greeter`, `lock-screen` or `background`.
    #[zbus(property)]
    fn class(&self) -> zbus::Result<String>;

    /// Whether the session is remote (SSH, say).
    #[zbus(property)]
    fn remote(&self) -> zbus::Result<bool>;

    /// The remote host, when remote.
    #[zbus(property)]
    fn remote_host(&self) -> zbus::Result<String>;

    /// The session's user name.
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
}
