//! Test harness shared by the end-to-end tests and the benchmark tools: node processes, real
//! WebSocket clients and tokens. Everything here talks to loopback addresses only.

pub mod client;
pub mod cluster;
pub mod history;
pub mod local;
mod process;
pub mod rebalance;

pub use process::{NodeProcess, bench_binary, free_port, node_binary, operator_binary, raise_nofile};

use jsonwebtoken::{EncodingKey, Header, encode};
use serde::Serialize;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    name: &'a str,
    roles: &'a [&'a str],
    exp: i64,
    iat: i64,
}

/// An HS256 token as the node expects it; a negative `ttl_secs` gives an expired one.
pub fn mint_token(secret: &str, sub: &str, name: &str, roles: &[&str], ttl_secs: i64) -> String {
    let now = unix_now();
    let claims = Claims { sub, name, roles, exp: now + ttl_secs, iat: now };
    encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes()))
        .expect("HS256 encoding of plain claims cannot fail")
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}
pub mod dns;
pub mod netns;
