//! Raft's network over the peer links: each RPC is a `call` frame to the peer named in the
//! target member's node record, answered by a `reply` frame with the same call number. Calls
//! to a peer that is not linked fail at once as unreachable; calls in flight when its link
//! drops fail then.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, network::Backoff};
use tokio::sync::oneshot;

use super::types::TypeConfig;
use super::wire::{RaftReply, RaftRpc, ReplicaFrame};
use crate::cluster::Cluster;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("peer {0} is not linked")]
    NotLinked(String),
    #[error("the link to {0} dropped")]
    LinkLost(String),
    #[error("no answer in time")]
    Timeout,
    #[error("the peer answered for another member")]
    WrongMember,
    #[error("the peer's answer did not match the call")]
    Mismatch,
}

/// Calls waiting for their replies.
#[derive(Default)]
pub struct Calls {
    next: AtomicU64,
    pending: Mutex<HashMap<u64, (String, oneshot::Sender<RaftReply>)>>,
}

impl Calls {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, (String, oneshot::Sender<RaftReply>)>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn call(
        &self,
        cluster: &Cluster,
        peer: &str,
        group: u32,
        to: u64,
        rpc: RaftRpc,
        ttl: Duration,
    ) -> Result<RaftReply, CallError> {
        let call = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().insert(call, (peer.to_owned(), tx));
        if !cluster.send(peer, ReplicaFrame::Call { call, group, to, rpc }.encode()) {
            self.lock().remove(&call);
            return Err(CallError::NotLinked(peer.to_owned()));
        }
        let outcome = tokio::time::timeout(ttl, rx).await;
        self.lock().remove(&call);
        match outcome {
            Ok(Ok(RaftReply::WrongMember)) => Err(CallError::WrongMember),
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(CallError::LinkLost(peer.to_owned())),
            Err(_) => Err(CallError::Timeout),
        }
    }

    /// A reply arrived from `peer`.
    pub fn answer(&self, peer: &str, call: u64, reply: RaftReply) {
        let mut pending = self.lock();
        if pending.get(&call).is_some_and(|(to, _)| to == peer)
            && let Some((_, tx)) = pending.remove(&call)
        {
            let _ = tx.send(reply);
        }
    }

    /// The link to `peer` dropped: its calls fail now rather than at their deadline.
    pub fn fail_peer(&self, peer: &str) {
        self.lock().retain(|_, (to, _)| to != peer);
    }
}

/// Creates the clients of one group's Raft.
pub struct NetworkFactory {
    pub group: u32,
    pub cluster: Arc<Cluster>,
    pub calls: Arc<Calls>,
}

pub struct Client {
    group: u32,
    target: u64,
    peer: String,
    cluster: Arc<Cluster>,
    calls: Arc<Calls>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Client;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Client {
        Client {
            group: self.group,
            target,
            peer: node.addr.clone(),
            cluster: self.cluster.clone(),
            calls: self.calls.clone(),
        }
    }
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<u64, BasicNode, RaftError<u64, E>>>;

impl Client {
    async fn call(&self, rpc: RaftRpc, option: &RPCOption) -> Result<RaftReply, CallError> {
        self.calls.call(&self.cluster, &self.peer, self.group, self.target, rpc, option.hard_ttl()).await
    }

    fn failed<E: std::error::Error>(err: CallError) -> RPCError<u64, BasicNode, RaftError<u64, E>> {
        match err {
            CallError::Timeout | CallError::Mismatch => RPCError::Network(NetworkError::new(&err)),
            _ => RPCError::Unreachable(Unreachable::new(&err)),
        }
    }

    fn remote<E: std::error::Error>(&self, err: RaftError<u64, E>) -> RPCError<u64, BasicNode, RaftError<u64, E>> {
        RPCError::RemoteError(RemoteError::new(self.target, err))
    }
}

impl RaftNetwork<TypeConfig> for Client {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>> {
        match self.call(RaftRpc::Append(rpc), &option).await {
            Ok(RaftReply::Append(Ok(response))) => Ok(response),
            Ok(RaftReply::Append(Err(err))) => Err(self.remote(err)),
            Ok(_) => Err(Self::failed(CallError::Mismatch)),
            Err(err) => Err(Self::failed(err)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        match self.call(RaftRpc::Snapshot(rpc), &option).await {
            Ok(RaftReply::Snapshot(Ok(response))) => Ok(response),
            Ok(RaftReply::Snapshot(Err(err))) => Err(self.remote(err)),
            Ok(_) => Err(Self::failed(CallError::Mismatch)),
            Err(err) => Err(Self::failed(err)),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<u64>, option: RPCOption) -> RpcResult<VoteResponse<u64>> {
        match self.call(RaftRpc::Vote(rpc), &option).await {
            Ok(RaftReply::Vote(Ok(response))) => Ok(response),
            Ok(RaftReply::Vote(Err(err))) => Err(self.remote(err)),
            Ok(_) => Err(Self::failed(CallError::Mismatch)),
            Err(err) => Err(Self::failed(err)),
        }
    }

    /// Links come back within a discovery round or a redial: retry soon, not after 500 ms.
    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }
}
