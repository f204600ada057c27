//! Policy reload: on SIGHUP and when the configuration file changes, the proxy reads it
//! again and, if it loads and validates, swaps in the new policy for new sessions. Open
//! sessions keep the decision they were admitted with. A bad file keeps the last good
//! policy; the reason (file, line, column, field) is logged and counted.
//!
//! What reloads: `roles` (the policy). `databases` carry upstream settings (TLS, the
//! database-client CA's users, IAM token caches) that sessions and kept server sessions
//! hold, so a file whose `databases` differ is refused with a message saying a restart
//! applies it, rather than half-applied.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::Shared;
use crate::config::{ConfigError, ProxyConfig};
use crate::policy::Policy;
use crate::telemetry::proxy::{CONFIG_INFO, CONFIG_RELOADS_TOTAL};

/// How often the file is looked at for changes (its modification time and size first,
/// its hash only when those moved).
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Load(#[from] ConfigError),
    #[error("{path}: invalid policy: {reason}")]
    Policy { path: PathBuf, reason: String },
    #[error(
        "{path}: databases changed; upstream settings are applied by a restart (roles reload live)"
    )]
    DatabasesChanged { path: PathBuf },
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The hex SHA-256 of `bytes`.
pub fn hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Exports the loaded file's hash (`gateway_proxy_config_info{sha256}` = 1, the previous
/// one set to 0).
pub fn export_hash(new: &str, old: Option<&str>) {
    if let Some(old) = old.filter(|o| *o != new) {
        metrics::gauge!(CONFIG_INFO, "sha256" => old.to_owned()).set(0.0);
    }
    metrics::gauge!(CONFIG_INFO, "sha256" => new.to_owned()).set(1.0);
}

/// Loads `path` and, when it is good, swaps its policy in. Counts and logs either way.
pub fn reload(shared: &Shared, path: &Path) -> Result<(), ReloadError> {
    let result = try_reload(shared, path);
    let label = if result.is_ok() { "success" } else { "error" };
    metrics::counter!(CONFIG_RELOADS_TOTAL, "result" => label).increment(1);
    match &result {
        Ok(()) => tracing::info!(config = %path.display(), "policy reloaded"),
        Err(e) => tracing::error!(error = %e, "policy reload refused; the last good policy stays"),
    }
    result
}

fn try_reload(shared: &Shared, path: &Path) -> Result<(), ReloadError> {
    let cfg = ProxyConfig::load(path)?;
    let same = |a: &ProxyConfig| serde_json::to_value(&a.databases).ok();
    if same(&cfg) != same(&shared.cfg) {
        return Err(ReloadError::DatabasesChanged {
            path: path.to_owned(),
        });
    }
    let policy =
        Policy::compile(&cfg.roles, &cfg.databases).map_err(|reason| ReloadError::Policy {
            path: path.to_owned(),
            reason,
        })?;
    shared.policy.store(std::sync::Arc::new(policy));
    Ok(())
}

/// Watches `path` for changes: returns its (modification time, size, hash) now.
pub fn stamp(path: &Path) -> Result<(Option<SystemTime>, u64, String), ReloadError> {
    let read = |source| ReloadError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    let bytes = std::fs::read(path).map_err(read)?;
    Ok((meta.modified().ok(), meta.len(), hash(&bytes)))
}

/// Runs until `stop` resolves: reloads on SIGHUP and when the file's content changes.
pub async fn watch(
    shared: std::sync::Arc<Shared>,
    path: PathBuf,
    stop: impl std::future::Future<Output = ()>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(%e, "no SIGHUP handler; reloading on file changes only");
            None
        }
    };
    let mut loaded = stamp(&path).map(|s| s.2).ok();
    if let Some(h) = &loaded {
        export_hash(h, None);
    }
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tokio::pin!(stop);
    loop {
        let forced = tokio::select! {
            _ = &mut stop => return,
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => true,
            _ = tick.tick() => false,
        };
        let now = match stamp(&path) {
            Ok(s) => s.2,
            Err(e) => {
                if forced {
                    metrics::counter!(CONFIG_RELOADS_TOTAL, "result" => "error").increment(1);
                    tracing::error!(error = %e, "policy reload refused; the last good policy stays");
                }
                continue;
            }
        };
        if !forced && loaded.as_deref() == Some(now.as_str()) {
            continue;
        }
        // A changed file is tried once per content: a broken one is not retried (and
        // counted) every tick, only when it changes again or on SIGHUP.
        let previous = loaded.replace(now.clone());
        if reload(&shared, &path).is_ok() {
            export_hash(&now, previous.as_deref());
        }
    }
}
