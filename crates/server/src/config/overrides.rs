//! The flags `--tcp`, `--udp`, `--state` and `--metrics`: they win over the file, at start
//! and at every reload.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::Config;

/// Settings given on the command line; they win over the file, at start and at every reload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// `--tcp`
    pub tcp: Option<SocketAddr>,
    /// `--udp`
    pub udp: Option<SocketAddr>,
    /// `--state`
    pub state: Option<PathBuf>,
    /// `--metrics`
    pub metrics: Option<String>,
    /// Which of `tcp`, `udp` and `metrics` are the addresses of sockets passed by systemd
    /// (socket activation), set in their place: they win over the file as a flag does.
    pub from_systemd: FromSystemd,
}

/// Which listening sockets systemd passed ([`crate::activation`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FromSystemd {
    /// The TCRP listener.
    pub tcp: bool,
    /// The UCRP socket.
    pub udp: bool,
    /// The metrics listener.
    pub metrics: bool,
}

/// What overrides a listening address or the state path in the file: a command-line flag, a
/// socket passed by systemd, or nothing; for the reload's warnings.
pub fn overrider(flag: bool, from_systemd: bool) -> Option<&'static str> {
    match (flag, from_systemd) {
        (_, true) => Some("a socket passed by systemd"),
        (true, false) => Some("a command-line flag"),
        (false, false) => None,
    }
}

impl Overrides {
    /// Applies the overrides to `config`.
    pub fn apply(&self, config: &mut Config) {
        if let Some(tcp) = self.tcp {
            config.listen.tcp = tcp;
        }
        if let Some(udp) = self.udp {
            config.listen.udp = udp;
        }
        if let Some(state) = &self.state {
            config.state.path = state.clone();
        }
        if let Some(metrics) = &self.metrics {
            config.listen.metrics = metrics.clone();
        }
    }
}
