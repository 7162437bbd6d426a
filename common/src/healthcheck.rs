//! The `healthcheck` subcommand both binaries have: asks a running instance's `/healthz`, for
//! container health checks on images without a shell or curl.
//!
//! Plain blocking HTTP/1.1 over `std::net`, so it starts no runtime and needs no TLS: it runs
//! every 30 s in a container and must cost nothing.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::cli::ListenAddress;

/// How long the whole check may take.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Why the instance is not healthy, in one line.
#[derive(Debug, thiserror::Error)]
pub enum Unhealthy {
    /// The address did not resolve.
    #[error("{0}: cannot resolve")]
    Resolve(String),
    /// Connecting, sending or reading failed.
    #[error("{url}: {what}: {source}")]
    Io {
        /// What was asked.
        url: String,
        /// The step that failed.
        what: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
    /// No answer within [`TIMEOUT`].
    #[error("{0}: no answer within {TIMEOUT:?}")]
    Timeout(String),
    /// An answer that is not HTTP.
    #[error("{0}: not an HTTP answer")]
    NotHttp(String),
    /// An answer other than 200.
    #[error("{url}: HTTP {status}")]
    Status {
        /// What was asked.
        url: String,
        /// The status it answered.
        status: u16,
    },
}

/// Where to ask: the listen address, with an unspecified or absent host made loopback (the
/// check runs next to the server).
fn target(address: &ListenAddress) -> Result<SocketAddr, Unhealthy> {
    let loopback = |ip: IpAddr| match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    match &address.host {
        None => Ok(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            address.port,
        )),
        Some(host) => match host.parse::<IpAddr>() {
            Ok(ip) => Ok(SocketAddr::new(loopback(ip), address.port)),
            Err(_) => (host.as_str(), address.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut all| all.next())
                .ok_or_else(|| Unhealthy::Resolve(address.to_string())),
        },
    }
}

/// Asks `GET /healthz` at `address`; `Ok` only for a 200 within [`TIMEOUT`].
pub fn check(address: &ListenAddress) -> Result<(), Unhealthy> {
    let started = Instant::now();
    let target = target(address)?;
    let url = format!("http://{target}/healthz");
    let io = |what| {
        let url = url.clone();
        move |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                Unhealthy::Timeout(url.clone())
            }
            _ => Unhealthy::Io { url, what, source },
        }
    };
    let left = || {
        TIMEOUT
            .checked_sub(started.elapsed())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| Unhealthy::Timeout(url.clone()))
    };
    let mut stream = TcpStream::connect_timeout(&target, left()?).map_err(io("connect"))?;
    stream
        .set_write_timeout(Some(left()?))
        .map_err(io("connect"))?;
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {target}\r\nUser-Agent: aistack-healthcheck\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(io("send"))?;
    // The status line is all that matters; read until it is complete.
    let mut head = Vec::with_capacity(64);
    let mut buffer = [0_u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        stream.set_read_timeout(Some(left()?)).map_err(io("read"))?;
        let n = stream.read(&mut buffer).map_err(io("read"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..n]);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let status = std::str::from_utf8(line)
        .ok()
        .and_then(|l| {
            let mut parts = l.split_whitespace();
            parts
                .next()
                .filter(|v| v.starts_with("HTTP/"))
                .and(parts.next())
        })
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| Unhealthy::NotHttp(url.clone()))?;
    if status == 200 {
        Ok(())
    } else {
        Err(Unhealthy::Status { url, status })
    }
}

/// The subcommand: exit 0 when healthy, else 1 with one line on stderr saying why.
pub fn run(program: &str, address: &ListenAddress) -> std::process::ExitCode {
    match check(address) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("{program} healthcheck: {why}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    fn address(listener: &TcpListener) -> ListenAddress {
        format!("127.0.0.1:{}", listener.local_addr().unwrap().port())
            .parse()
            .unwrap()
    }

    /// Serves one connection with `answer` (after `delay`), from a thread.
    fn serve_once(answer: &'static [u8], delay: Duration) -> ListenAddress {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = address(&listener);
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0_u8; 512];
            let _ = stream.read(&mut request);
            std::thread::sleep(delay);
            let _ = stream.write_all(answer);
        });
        at
    }

    #[test]
    fn only_a_200_in_time_is_healthy() {
        let ok = serve_once(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            Duration::ZERO,
        );
        check(&ok).unwrap();

        let unavailable = serve_once(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
            Duration::ZERO,
        );
        let why = check(&unavailable).unwrap_err().to_string();
        assert!(why.ends_with("/healthz: HTTP 503"), "{why}");

        let garbage = serve_once(b"SSH-2.0-OpenSSH_9.6\r\n", Duration::ZERO);
        assert!(matches!(check(&garbage), Err(Unhealthy::NotHttp(_))));

        let hung = serve_once(b"HTTP/1.1 200 OK\r\n\r\n", Duration::from_secs(5));
        let started = Instant::now();
        assert!(matches!(check(&hung), Err(Unhealthy::Timeout(_))));
        assert!(started.elapsed() < TIMEOUT + Duration::from_millis(500));

        // Nobody listening.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = address(&listener);
        drop(listener);
        let why = check(&closed).unwrap_err().to_string();
        assert!(why.contains("connect"), "{why}");
    }

    #[test]
    fn every_interface_is_asked_on_loopback() {
        let any: ListenAddress = ":9470".parse().unwrap();
        assert_eq!(target(&any).unwrap().to_string(), "127.0.0.1:9470");
        let v4: ListenAddress = "0.0.0.0:9471".parse().unwrap();
        assert_eq!(target(&v4).unwrap().to_string(), "127.0.0.1:9471");
        let v6: ListenAddress = "[::]:9471".parse().unwrap();
        assert_eq!(target(&v6).unwrap().to_string(), "[::1]:9471");
        let named: ListenAddress = "localhost:9470".parse().unwrap();
        assert_eq!(target(&named).unwrap().port(), 9470);
    }
}
