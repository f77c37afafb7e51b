//! Who a client is (checked once, at the handshake) and what its roles allow per room.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, errors::ErrorKind};
use serde::Deserialize;
use wildmatch::WildMatch;

use crate::config::{AuthConfig, AuthMode};
use crate::protocol::UserInfo;

/// An authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: UserInfo,
    pub roles: Vec<String>,
    /// Unix seconds after which the connection must end (the token's `exp`).
    pub expires_at: Option<u64>,
}

/// Why a handshake is refused; each maps to one HTTP status and stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required (Authorization: Bearer <jwt> or ?token=<jwt>)")]
    MissingToken,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("the token carries none of the roles allowed to connect: {0}")]
    Forbidden(String),
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::Invalid(_) => "invalid_token",
            Self::Forbidden(_) => "forbidden",
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            Self::Forbidden(_) => 403,
            _ => 401,
        }
    }
}

/// A secret file could not be read at start-up.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {field} {path}: {source}")]
pub struct KeyError {
    field: &'static str,
    path: String,
    source: std::io::Error,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    exp: u64,
}

struct RoomRuleMatcher {
    pattern: WildMatch,
    join_roles: Vec<String>,
    publish_roles: Vec<String>,
}

/// Checks tokens and room permissions; built once from the config.
pub struct Authenticator {
    mode: AuthMode,
    key: Option<DecodingKey>,
    validation: Validation,
    connect_roles: Vec<String>,
    rooms: Vec<RoomRuleMatcher>,
    anonymous_ids: AtomicU64,
}

fn has_any_role(roles: &[String], allowed: &[String]) -> bool {
    allowed.is_empty() || roles.iter().any(|r| allowed.contains(r))
}

impl Authenticator {
    pub fn from_config(config: &AuthConfig) -> Result<Self, KeyError> {
        let secret = match (&config.jwt_secret_file, &config.jwt_secret) {
            (Some(path), _) => Some(read_secret("auth.jwt_secret_file", path)?),
            (None, Some(secret)) => Some(secret.as_bytes().to_vec()),
            (None, None) => None,
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = config.leeway_secs;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
        }
        match &config.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(Self {
            mode: config.mode,
            key: secret.map(|s| DecodingKey::from_secret(&s)),
            validation,
            connect_roles: config.connect_roles.clone(),
            rooms: config
                .rooms
                .iter()
                .map(|r| RoomRuleMatcher {
                    pattern: WildMatch::new(&r.pattern),
                    join_roles: r.join_roles.clone(),
                    publish_roles: r.publish_roles.clone(),
                })
                .collect(),
            anonymous_ids: AtomicU64::new(0),
        })
    }

    /// Authenticates a handshake from its token (header or query) and, in anonymous mode, the
    /// display name the client asked for.
    pub fn authenticate(&self, token: Option<&str>, anonymous_name: Option<&str>) -> Result<Identity, AuthError> {
        let identity = match (self.mode, &self.key) {
            (AuthMode::Anonymous, _) => self.anonymous(anonymous_name),
            (AuthMode::Jwt, None) => return Err(AuthError::Invalid("no key configured".into())),
            (AuthMode::Jwt, Some(key)) => {
                let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::MissingToken)?;
                let data = decode::<Claims>(token, key, &self.validation).map_err(|e| match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    _ => AuthError::Invalid(e.to_string()),
                })?;
                let claims = data.claims;
                if claims.sub.is_empty() || claims.sub.len() > 256 {
                    return Err(AuthError::Invalid("sub must be 1 to 256 characters".into()));
                }
                let name = claims.name.filter(|n| !n.trim().is_empty()).unwrap_or_else(|| claims.sub.clone());
                Identity {
                    user: UserInfo { id: claims.sub, name: truncate(&name, 64) },
                    roles: claims.roles,
                    expires_at: Some(claims.exp.saturating_add(self.validation.leeway)),
                }
            }
        };
        if !has_any_role(&identity.roles, &self.connect_roles) {
            return Err(AuthError::Forbidden(self.connect_roles.join(", ")));
        }
        Ok(identity)
    }

    fn anonymous(&self, name: Option<&str>) -> Identity {
        let n = self.anonymous_ids.fetch_add(1, Ordering::Relaxed);
        let id = format!("anon-{:x}-{n}", rand::random::<u32>());
        let name =
            name.map(str::trim).filter(|n| !n.is_empty()).map_or_else(|| format!("guest-{n}"), |n| truncate(n, 64));
        Identity { user: UserInfo { id, name }, roles: Vec::new(), expires_at: None }
    }

    fn rule_for(&self, room: &str) -> Option<&RoomRuleMatcher> {
        self.rooms.iter().find(|r| r.pattern.matches(room))
    }

    /// Whether `auth.rooms` covers `room` (always, when there are no rules).
    pub fn has_rule_for(&self, room: &str) -> bool {
        self.rooms.is_empty() || self.rule_for(room).is_some()
    }

    pub fn may_join(&self, identity: &Identity, room: &str) -> bool {
        self.rule_for(room).is_none_or(|r| has_any_role(&identity.roles, &r.join_roles))
    }

    pub fn may_publish(&self, identity: &Identity, room: &str) -> bool {
        self.rule_for(room).is_none_or(|r| {
            has_any_role(&identity.roles, &r.join_roles) && has_any_role(&identity.roles, &r.publish_roles)
        })
    }
}

/// Reads a secret file (`field` names it in errors). A trailing newline, which secrets written
/// by hand often have, is not part of the secret.
pub fn read_secret(field: &'static str, path: &Path) -> Result<Vec<u8>, KeyError> {
    let raw = std::fs::read(path).map_err(|source| KeyError { field, path: path.display().to_string(), source })?;
    let trimmed = raw.strip_suffix(b"\n").unwrap_or(&raw);
    Ok(trimmed.strip_suffix(b"\r").unwrap_or(trimmed).to_vec())
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoomRule;
    use jsonwebtoken::{EncodingKey, Header, encode};

    const SECRET: &str = "0123456789abcdef0123";

    fn auth(rooms: Vec<RoomRule>, connect_roles: &[&str]) -> Authenticator {
        let config = AuthConfig {
            jwt_secret: Some(SECRET.into()),
            rooms,
            connect_roles: connect_roles.iter().map(|s| s.to_string()).collect(),
            leeway_secs: 0,
            ..AuthConfig::default()
        };
        Authenticator::from_config(&config).unwrap()
    }

    fn token(secret: &str, roles: &[&str], exp_in: i64) -> String {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let claims = serde_json::json!({"sub": "u1", "name": "Ann", "roles": roles, "exp": now + exp_in});
        encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    #[test]
    fn valid_token_gives_identity() {
        let id = auth(vec![], &[]).authenticate(Some(&token(SECRET, &["admin"], 60)), None).unwrap();
        assert_eq!(id.user, UserInfo { id: "u1".into(), name: "Ann".into() });
        assert_eq!(id.roles, vec!["admin".to_owned()]);
    }

    #[test]
    fn bad_tokens_are_refused_with_their_reason() {
        let a = auth(vec![], &[]);
        assert_eq!(a.authenticate(None, None), Err(AuthError::MissingToken));
        assert_eq!(a.authenticate(Some(&token(SECRET, &[], -60)), None), Err(AuthError::Expired));
        let forged = a.authenticate(Some(&token("another-secret-000000", &[], 60)), None).unwrap_err();
        assert_eq!(forged.code(), "invalid_token");
        assert_eq!(a.authenticate(Some("not.a.jwt"), None).unwrap_err().http_status(), 401);
    }

    fn signed(claims: serde_json::Value) -> String {
        encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
    }

    #[test]
    fn a_token_from_the_future_is_refused_until_its_nbf_within_leeway() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let early = signed(serde_json::json!({"sub": "u1", "exp": now + 7200, "nbf": now + 3600}));
        let err = auth(vec![], &[]).authenticate(Some(&early), None).unwrap_err();
        assert_eq!((err.code(), err.http_status()), ("token_not_yet_valid", 401));
        // Within the configured leeway a slightly early clock is forgiven.
        let lenient = AuthConfig { jwt_secret: Some(SECRET.into()), leeway_secs: 120, ..AuthConfig::default() };
        let soon = signed(serde_json::json!({"sub": "u1", "exp": now + 7200, "nbf": now + 60}));
        assert!(Authenticator::from_config(&lenient).unwrap().authenticate(Some(&soon), None).is_ok());
    }

    #[test]
    fn the_largest_exp_does_not_overflow() {
        let forever = signed(serde_json::json!({"sub": "u1", "exp": u64::MAX}));
        let lenient = AuthConfig { jwt_secret: Some(SECRET.into()), leeway_secs: 60, ..AuthConfig::default() };
        let id = Authenticator::from_config(&lenient).unwrap().authenticate(Some(&forever), None).unwrap();
        assert_eq!(id.expires_at, Some(u64::MAX));
    }

    #[test]
    fn connect_roles_are_checked_at_the_handshake() {
        let a = auth(vec![], &["chat"]);
        let err = a.authenticate(Some(&token(SECRET, &["other"], 60)), None).unwrap_err();
        assert_eq!(err.http_status(), 403);
        assert!(a.authenticate(Some(&token(SECRET, &["chat"], 60)), None).is_ok());
    }

    #[test]
    fn room_rules_first_match_wins() {
        let rules = vec![
            RoomRule { pattern: "ops-*".into(), join_roles: vec!["ops".into()], publish_roles: vec![] },
            RoomRule { pattern: "news".into(), join_roles: vec![], publish_roles: vec!["editor".into()] },
        ];
        let a = auth(rules, &[]);
        let ops = a.authenticate(Some(&token(SECRET, &["ops"], 60)), None).unwrap();
        let reader = a.authenticate(Some(&token(SECRET, &[], 60)), None).unwrap();
        assert!(a.may_join(&ops, "ops-eu") && a.may_publish(&ops, "ops-eu"));
        assert!(!a.may_join(&reader, "ops-eu"));
        assert!(a.may_join(&reader, "news") && !a.may_publish(&reader, "news"));
        assert!(a.may_publish(&reader, "lobby"));
    }

    #[test]
    fn anonymous_mode_names_guests() {
        let config = AuthConfig { mode: AuthMode::Anonymous, ..AuthConfig::default() };
        let a = Authenticator::from_config(&config).unwrap();
        let bob = a.authenticate(None, Some(" Bob ")).unwrap();
        assert_eq!(bob.user.name, "Bob");
        assert!(bob.user.id.starts_with("anon-"));
        assert_ne!(a.authenticate(None, None).unwrap().user.id, bob.user.id);
    }
}
