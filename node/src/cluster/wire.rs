//! The peer-link handshake: JSON text frames, tagged by `t`. Kept apart from the client
//! protocol: clients can never send or receive these. After the handshake a link carries the
//! replication layer's frames (`replication::wire`), each sealed (`seal`) in a binary frame.

use serde::{Deserialize, Serialize};

/// Close code for a dial from the node whose id sorts higher: the lower one dials instead.
pub const CLOSE_DIAL_BACK: u16 = 4100;
/// Close code for a peer that failed the HMAC challenge.
pub const CLOSE_AUTH_FAILED: u16 = 4101;
/// Close code for a link replaced by a newer one between the same pair.
pub const CLOSE_REPLACED: u16 = 4102;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum PeerFrame {
    /// Acceptor → dialer, first frame: who I am, the nonce to sign and my key exchange value
    /// (X25519 public key, hex; see `seal`).
    Challenge { node_id: String, nonce: String, key: String },
    /// Dialer → acceptor: who I am, where my peer port is, my nonce, my key exchange value and
    /// my proof.
    Hello { node_id: String, peer_addr: String, nonce: String, key: String, mac: String },
    /// Acceptor → dialer: the acceptor's proof over the dialer's nonce.
    Accepted { mac: String },
}
