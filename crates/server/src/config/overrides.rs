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
