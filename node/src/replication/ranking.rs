//! Rendezvous (highest random weight) hashing: every node ranks the candidates for a room the
//! same way from names alone, and a membership change moves only the rooms of the node that
//! came or went.

use sha2::{Digest, Sha256};

fn weight(room: &str, node: &str) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(room.as_bytes());
    hasher.update([0]);
    hasher.update(node.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The candidate that owns `room`, if there is any candidate.
pub fn owner<'a>(room: &str, candidates: &'a [String]) -> Option<&'a str> {
    candidates.iter().max_by_key(|node| (weight(room, node), node.as_str())).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("chat-{i}")).collect()
    }

    #[test]
    fn order_of_candidates_does_not_matter() {
        let mut a = nodes(5);
        let b: Vec<String> = a.iter().rev().cloned().collect();
        for room in ["lobby", "ops", "r1", "r2"] {
            assert_eq!(owner(room, &a), owner(room, &b));
        }
        a.clear();
        assert_eq!(owner("lobby", &a), None);
    }

    #[test]
    fn adding_a_node_only_moves_rooms_to_it() {
        let three = nodes(3);
        let four = nodes(4);
        let rooms: Vec<String> = (0..400).map(|i| format!("room-{i}")).collect();
        let mut moved = 0;
        for room in &rooms {
            let before = owner(room, &three);
            let after = owner(room, &four);
            if before != after {
                assert_eq!(after, Some("chat-3"), "{room} moved between old nodes");
                moved += 1;
            }
        }
        // About a quarter of the rooms move to the new node.
        assert!((60..140).contains(&moved), "{moved} of 400 moved");
    }
}
