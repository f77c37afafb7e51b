//! Log setup: human-readable lines by default, one JSON object per line with `log.format = json`.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber; `RUST_LOG` overrides `log.filter`.
pub fn init(log: &LogConfig) {
    let directives = std::env::var("RUST_LOG").ok().filter(|d| !d.is_empty()).unwrap_or_else(|| log.filter.clone());
    let filter = EnvFilter::try_new(quiet_raft(&directives)).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = match log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

/// openraft narrates every vote and append at `info`: it logs errors only, unless the
/// directives name it (`openraft=info`).
fn quiet_raft(directives: &str) -> String {
    if directives.contains("openraft") { directives.to_owned() } else { format!("{directives},openraft=error") }
}

#[cfg(test)]
mod tests {
    #[test]
    fn openraft_is_quiet_unless_named() {
        assert_eq!(super::quiet_raft("info"), "info,openraft=error");
        assert_eq!(super::quiet_raft("debug,openraft=info"), "debug,openraft=info");
    }
}
