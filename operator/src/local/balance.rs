//! Local mode's counterpart of the operator's rebalance Events: every two seconds it asks a
//! ready node's `/cluster` whether the cluster is rebalancing, prints `RebalanceStarted` and
//! `RebalanceFinished` as they happen, and keeps the answer for the status file.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::reconcile::balance::{ask, transition};

const EVERY: Duration = Duration::from_secs(2);
/// Nodes asked in turn each time.
const NODES_ASKED: usize = 3;

#[derive(Default)]
struct State {
    /// Admin addresses of the ready nodes, in ordinal order; nothing is asked below two.
    admins: Vec<SocketAddr>,
    enabled: bool,
    rebalancing: Option<bool>,
}

#[derive(Default)]
pub struct BalanceWatch {
    state: Mutex<State>,
}

impl BalanceWatch {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ready nodes to ask, and whether `spec.rebalance` is on.
    pub fn set_nodes(&self, admins: Vec<SocketAddr>, enabled: bool) {
        let mut state = self.state();
        state.admins = admins;
        state.enabled = enabled;
        if !enabled || state.admins.len() < 2 {
            state.rebalancing = None;
        }
    }

    /// What the nodes said last (`status.rebalancing`).
    pub fn rebalancing(&self) -> Option<bool> {
        self.state().rebalancing
    }

    /// Asks until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(EVERY);
        while !*stop.borrow() {
            tokio::select! {
                _ = tick.tick() => self.ask_once().await,
                _ = stop.changed() => {}
            }
        }
    }

    async fn ask_once(&self) {
        let admins = {
            let state = self.state();
            if !state.enabled || state.admins.len() < 2 {
                return;
            }
            state.admins.clone()
        };
        for admin in admins.iter().take(NODES_ASKED) {
            let balance = match ask(&admin.ip().to_string(), admin.port()).await {
                Ok(balance) => balance,
                Err(err) => {
                    tracing::debug!(%err, "could not ask a node about its rebalancing");
                    continue;
                }
            };
            let mut state = self.state();
            if let Some((reason, note)) = transition(state.rebalancing, &balance) {
                println!("event {reason}: {note}");
                tracing::info!(reason, %note, "rebalance");
            }
            state.rebalancing = Some(balance.rebalancing);
            return;
        }
    }
}
