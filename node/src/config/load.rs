//! Reads the node config: built-in defaults < TOML file < `CHAT_*` environment < command-line
//! flags, then validates it. Every error names the field it is about.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};

use super::{ConfigError, NodeConfig};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Parse(String),
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Values given on the command line; each one set wins over file and environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub node_id: Option<String>,
    pub assets_dir: Option<String>,
    pub anonymous: bool,
    pub log_json: bool,
}

/// Top-level fields of the schema: other `CHAT_*` variables (e.g. ones a platform sets for its
/// own use) are not config and are left alone.
fn top_level_fields() -> Vec<String> {
    let schema = super::json_schema();
    schema.get("properties").and_then(|p| p.as_object()).map(|p| p.keys().cloned().collect()).unwrap_or_default()
}

pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<NodeConfig, LoadError> {
    let fields = top_level_fields();
    let mut figment = Figment::from(Serialized::defaults(NodeConfig::default()));
    if let Some(file) = file {
        std::fs::metadata(file)
            .map_err(|e| LoadError::Parse(format!("cannot read config file {}: {e}", file.display())))?;
        figment = figment.merge(Toml::file_exact(file));
    }
    figment = figment.merge(Env::prefixed("CHAT_").split("__").filter(move |key| {
        // The key may arrive before or after `split` turned `__` into `.`.
        let first = key.as_str().split(['.']).next().unwrap_or("").split("__").next().unwrap_or("");
        fields.iter().any(|f| f.eq_ignore_ascii_case(first))
    }));
    let o = overrides;
    for (key, value) in [
        ("listen", &o.listen),
        ("admin.listen", &o.admin_listen),
        ("node_id", &o.node_id),
        ("assets_dir", &o.assets_dir),
    ] {
        if let Some(value) = value {
            figment = figment.merge((key, value));
        }
    }
    if o.anonymous {
        figment = figment.merge(("auth.mode", "anonymous"));
    }
    if o.log_json {
        figment = figment.merge(("log.format", "json"));
    }
    let config: NodeConfig = figment.extract().map_err(|e| LoadError::Parse(describe(e)))?;
    config.validate()?;
    Ok(config)
}

/// One line per problem, with the dotted field path and where the value came from.
fn describe(err: figment::Error) -> String {
    err.into_iter()
        .map(|e| {
            let field = if e.path.is_empty() { String::from("(top level)") } else { e.path.join(".") };
            let source = e.metadata.as_ref().map(|m| format!(" (from {})", m.name)).unwrap_or_default();
            format!("invalid config: {field}: {}{source}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn file_then_flags() {
        let f = file("listen = \"127.0.0.1:9000\"\n[auth]\nmode = \"anonymous\"\n[history]\nsize = 5\n");
        let cfg = load(Some(f.path()), &Overrides::default()).unwrap();
        assert_eq!((cfg.listen.port(), cfg.history.size), (9000, 5));
        let flags = Overrides { listen: Some("127.0.0.1:9100".into()), ..Overrides::default() };
        assert_eq!(load(Some(f.path()), &flags).unwrap().listen.port(), 9100);
    }

    #[test]
    fn errors_name_the_field() {
        let f = file("[auth]\nmode = \"anonymous\"\n[limits]\nmax_connections = \"many\"\n");
        let err = load(Some(f.path()), &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("limits.max_connections"), "{err}");
        let f = file("[auth]\nmode = \"anonymous\"\n[limits]\nmax_conections = 5\n");
        let err = load(Some(f.path()), &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("max_conections"), "{err}");
        let f = file("[auth]\nmode = \"anonymous\"\n[drain]\nrate_per_sec = 0\n");
        let err = load(Some(f.path()), &Overrides::default()).unwrap_err().to_string();
        assert_eq!(err, "invalid config: drain.rate_per_sec: must be at least 1");
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = load(Some(Path::new("/nonexistent/node.toml")), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("node.toml"), "{err}");
    }
}
