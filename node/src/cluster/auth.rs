//! Mutual HMAC-SHA256 challenge between nodes: each side proves it knows the cluster secret by
//! signing the other's fresh nonce. The secret itself never crosses the wire.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const CONTEXT: &str = "chatcluster-peer-v1";

pub fn nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

fn mac(secret: &[u8], role: &str, nonce: &str, signer: &str, verifier: &str) -> HmacSha256 {
    // Keys of any length are valid for HMAC.
    let mut mac = HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    for part in [CONTEXT, role, nonce, signer, verifier] {
        mac.update(part.as_bytes());
        mac.update(b"\0");
    }
    mac
}

/// `signer`'s proof over the `nonce` that `verifier` sent it.
pub fn sign(secret: &[u8], role: &str, nonce: &str, signer: &str, verifier: &str) -> String {
    hex::encode(mac(secret, role, nonce, signer, verifier).finalize().into_bytes())
}

/// Constant-time check of a proof.
pub fn verify(secret: &[u8], role: &str, nonce: &str, signer: &str, verifier: &str, proof: &str) -> bool {
    let Ok(bytes) = hex::decode(proof) else { return false };
    mac(secret, role, nonce, signer, verifier).verify_slice(&bytes).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_secret_nonce_and_both_ids() {
        let n = nonce();
        let proof = sign(b"s3cret", "dialer", &n, "a", "b");
        assert!(verify(b"s3cret", "dialer", &n, "a", "b", &proof));
        assert!(!verify(b"other", "dialer", &n, "a", "b", &proof));
        assert!(!verify(b"s3cret", "dialer", &nonce(), "a", "b", &proof));
        assert!(!verify(b"s3cret", "acceptor", &n, "a", "b", &proof));
        assert!(!verify(b"s3cret", "dialer", &n, "b", "a", &proof));
        assert!(!verify(b"s3cret", "dialer", &n, "a", "b", "zz"));
    }
}
