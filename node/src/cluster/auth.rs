//! Mutual HMAC-SHA256 challenge between nodes: each side proves it knows the cluster secret by
//! signing the other's fresh nonce and both sides' key exchange values (`seal`), so nobody in
//! the middle can swap those. The secret itself never crosses the wire.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const CONTEXT: &str = "chatcluster-peer-v2";

pub fn nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// What one proof covers besides the secret.
#[derive(Clone, Copy)]
pub struct Proof<'a> {
    /// `dialer` or `acceptor`: whose proof this is.
    pub role: &'a str,
    /// The nonce the other side sent.
    pub nonce: &'a str,
    pub signer: &'a str,
    pub verifier: &'a str,
    /// Both key exchange values, the dialer's first.
    pub dialer_key: &'a str,
    pub acceptor_key: &'a str,
}

fn mac(secret: &[u8], p: Proof<'_>) -> HmacSha256 {
    // Keys of any length are valid for HMAC.
    let mut mac = HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    for part in [CONTEXT, p.role, p.nonce, p.signer, p.verifier, p.dialer_key, p.acceptor_key] {
        mac.update(part.as_bytes());
        mac.update(b"\0");
    }
    mac
}

/// The signer's proof over what the verifier sent it.
pub fn sign(secret: &[u8], proof: Proof<'_>) -> String {
    hex::encode(mac(secret, proof).finalize().into_bytes())
}

/// Constant-time check of a proof.
pub fn verify(secret: &[u8], proof: Proof<'_>, mac_hex: &str) -> bool {
    let Ok(bytes) = hex::decode(mac_hex) else { return false };
    mac(secret, proof).verify_slice(&bytes).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_secret_nonce_both_ids_and_both_keys() {
        let n = nonce();
        let p = Proof { role: "dialer", nonce: &n, signer: "a", verifier: "b", dialer_key: "k1", acceptor_key: "k2" };
        let proof = sign(b"s3cret", p);
        assert!(verify(b"s3cret", p, &proof));
        assert!(!verify(b"other", p, &proof));
        let other_nonce = nonce();
        assert!(!verify(b"s3cret", Proof { nonce: &other_nonce, ..p }, &proof));
        assert!(!verify(b"s3cret", Proof { role: "acceptor", ..p }, &proof));
        assert!(!verify(b"s3cret", Proof { signer: "b", verifier: "a", ..p }, &proof));
        assert!(!verify(b"s3cret", Proof { dialer_key: "k3", ..p }, &proof), "a swapped key exchange value");
        assert!(!verify(b"s3cret", Proof { acceptor_key: "k3", ..p }, &proof), "a swapped key exchange value");
        assert!(!verify(b"s3cret", p, "zz"));
    }
}
