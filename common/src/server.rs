//! Serving an axum router: binding `--web.listen-address`, graceful shutdown on SIGTERM and
//! Ctrl-C (in-flight requests finish), and the small landing page both binaries show at `/`.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use axum::Router;
use tokio::net::TcpListener;

use crate::cli::ListenAddress;

/// Binds the listen address. `:port` binds every interface: IPv6 (dual-stack) when the host has
/// it, IPv4 otherwise.
pub async fn bind(address: &ListenAddress) -> io::Result<TcpListener> {
    match &address.host {
        None => {
            let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, address.port));
            match TcpListener::bind(v6).await {
                Ok(listener) => Ok(listener),
                Err(_) => {
                    TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, address.port))).await
                }
            }
        }
        Some(host) => TcpListener::bind((host.as_str(), address.port)).await,
    }
}

/// Serves `router` until SIGTERM or Ctrl-C, then lets in-flight requests finish.
pub async fn serve(listener: TcpListener, router: Router) -> io::Result<()> {
    let local = listener.local_addr()?;
    tracing::info!(address = %local, "listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!("shut down");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!(signal = "SIGINT", "shutting down"),
        () = terminate => tracing::info!(signal = "SIGTERM", "shutting down"),
    }
}

/// The HTML page at `/`: the program's name and version and a link per endpoint.
pub fn landing_page(program: &str, links: &[(&str, &str)]) -> String {
    let items: String = links
        .iter()
        .map(|(href, what)| format!("<li><a href=\"{href}\">{href}</a> {what}</li>\n"))
        .collect();
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{program}</title></head>\n\
         <body>\n<h1>{program}</h1>\n<p>version {}</p>\n<ul>\n{items}</ul>\n</body></html>\n",
        crate::LONG_VERSION
    )
}
