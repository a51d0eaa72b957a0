//! The command layer: one handler per client request. Each takes the decoded frame's fields,
//! calls the store (and the hub for subscriptions and publishing), and returns the reply;
//! none of them touches the socket.

use super::{Session, ack, store_error};
use crate::hook::Checked;
use crate::hub::Subscriber;
use crate::metrics::Metrics;
use crate::throttle::Event;
use std::sync::Arc;
use tandem_protocol::{
    Access, ClientFrame, CloseCode, DatasetRef, ErrorCode, LimitCode, Patch, RequestId,
    ServerFrame, decode_client_frame, peek_request_id,
};
use tandem_store::{DatasetKey, Snapshot, StoreError, UpdateOutcome, UpdateRequest};

impl Session {
    /// Handles one text frame; returns a close code when the connection must end.
    pub(super) async fn handle_text(&mut self, text: &str) -> Option<CloseCode> {
        // Every frame counts, also one that does not decode: each costs the node work, and
        // a flood of garbage is refused as cheaply as a flood of requests.
        if !self.admit(|| peek_request_id(text)) {
            return None;
        }
        let frame = match decode_client_frame(text) {
            Ok(frame) => frame,
            Err(e) => {
                self.reply(ServerFrame::error(e.id, ErrorCode::BadRequest, e.message));
                return None;
            }
        };
        let frame = match frame {
            ClientFrame::Auth {
                id,
                token,
                features,
            } => return self.auth(id, &token, &features),
            // A heartbeat: it keeps the socket alive but does not make the session busy.
            ClientFrame::Ping { id } => {
                self.reply(ServerFrame::Pong { id });
                return None;
            }
            frame => frame,
        };
        self.last_request = tokio::time::Instant::now();
        let Some(identity) = self.identity.clone() else {
            self.reply(ServerFrame::error(
                frame.id().cloned(),
                ErrorCode::Unauthorized,
                "authenticate first: send an auth frame",
            ));
            return None;
        };
        let reply = match frame {
            // The snapshot is queued by `subscribe` itself, in order with the pushes.
            ClientFrame::Subscribe {
                id,
                dataset,
                delta,
                since,
            } => {
                let delta = delta.unwrap_or(self.delta);
                self.subscribe(id, &identity, dataset, delta, since).await
            }
            ClientFrame::Unsubscribe { id, dataset } => {
                Some(self.unsubscribe(id, &identity, &dataset).await)
            }
            ClientFrame::Update {
                id,
                dataset,
                device_id,
                patches,
            } => {
                self.update(id, &identity, dataset, device_id, patches)
                    .await
            }
            ClientFrame::Changes { id, dataset, since } => {
                Some(self.changes(id, &identity, &dataset, since).await)
            }
            ClientFrame::ListDatasets { id } => Some(self.list_datasets(id, &identity).await),
            ClientFrame::DeleteDataset { id, dataset } => {
                Some(self.delete(id, &identity, &dataset).await)
            }
            ClientFrame::Grant {
                id,
                dataset,
                identity: grantee,
                access,
            } => Some(self.grant(id, &identity, &dataset, &grantee, access).await),
            ClientFrame::Revoke {
                id,
                dataset,
                identity: grantee,
            } => Some(self.revoke(id, &identity, &dataset, grantee).await),
            ClientFrame::History {
                id,
                dataset,
                before,
                limit,
            } => Some(self.history(id, &identity, &dataset, before, limit).await),
            ClientFrame::ReadAt {
                id,
                dataset,
                sync_count,
            } => Some(self.read_at(id, &identity, &dataset, sync_count).await),
            ClientFrame::Restore {
                id,
                dataset,
                sync_count,
                device_id,
            } => Some(
                self.restore(id, &identity, &dataset, sync_count, device_id)
                    .await,
            ),
            ClientFrame::Auth { .. } | ClientFrame::Ping { .. } => None,
        };
        if let Some(reply) = reply {
            self.reply(reply);
        }
        None
    }

    /// `auth`: the first token authenticates the session; later ones refresh its expiry.
    fn auth(
        &mut self,
        id: Option<RequestId>,
        token: &str,
        features: &[String],
    ) -> Option<CloseCode> {
        match self.gw.verifier.verify(token) {
            Ok(identity) => {
                if let Some(current) = &self.identity
                    && **current != *identity.sub
                {
                    // A session belongs to one identity; a refresh may not switch it.
                    self.reply(ServerFrame::error(
                        id,
                        ErrorCode::Forbidden,
                        "a session cannot change identity; open a new connection",
                    ));
                    return None;
                }
                let features = self.set_features(features);
                self.authenticated(id, identity, features)
            }
            Err(e) => {
                if self.gw.throttle.record(Event::TokenRefused) {
                    tracing::info!(error = %e, "token refused");
                }
                self.reply(ServerFrame::error(
                    id,
                    ErrorCode::Unauthorized,
                    e.to_string(),
                ));
                // A refused refresh leaves the session on its current, still valid token.
                self.identity.is_none().then_some(CloseCode::Unauthorized)
            }
        }
    }

    /// `subscribe`: returns an error frame, or `None` when the snapshot was queued.
    async fn subscribe(
        &mut self,
        id: RequestId,
        identity: &Arc<str>,
        dataset: DatasetRef,
        delta: bool,
        since: Option<u64>,
    ) -> Option<ServerFrame> {
        let key = match self.key(identity, &dataset) {
            Ok(key) => Arc::new(key),
            Err(e) => return Some(store_error(Some(id), &e)),
        };
        // An existing subscription only changes its push form. One the hub ended meanwhile
        // (delete, revoke) is gone from the outbox too, so it is subscribed afresh.
        let fresh = !self.outbox.set_delta(&key, delta);
        if fresh {
            let max = self.gw.config.max_subscriptions;
            if self.outbox.subscription_count() >= max {
                return Some(ServerFrame::limit_error(
                    Some(id),
                    LimitCode::MaxSubscriptions,
                    max as u64,
                    format!("more than {max} subscriptions on one connection"),
                ));
            }
        }
        // Register first, then read: a commit that lands in between is both in the snapshot
        // or pushed after it, never lost between the two.
        let key = if fresh {
            let subscriber = Subscriber {
                identity: identity.clone(),
                outbox: self.outbox.clone(),
            };
            match self.gw.hub.subscribe(key, self.id, subscriber).await {
                Ok(shared) => {
                    self.outbox.subscribe(shared.clone(), delta);
                    shared
                }
                Err(e) => {
                    tracing::warn!(error = %e, "channel subscribe failed");
                    return Some(ServerFrame::error(Some(id), e.code(), e.to_string()));
                }
            }
        } else {
            key
        };
        match self.read_for_subscribe(&key, identity, since).await {
            Ok((snapshot, since)) => {
                let frame = ServerFrame::Snapshot {
                    id,
                    dataset: key.to_ref(),
                    sync_count: snapshot.sync_count,
                    since,
                    records: snapshot.records,
                };
                self.snapshot_reply(&key, snapshot.sync_count, frame);
                tracing::debug!(dataset = %key, sync_count = snapshot.sync_count, "subscribed");
                None
            }
            Err(e) => {
                if fresh {
                    self.drop_subscription(&key).await;
                }
                Some(store_error(Some(id), &e))
            }
        }
    }

    /// What a subscribe reply carries: the changes after `since` when the client holds a
    /// state of this dataset (returned with `Some(since)`), else the whole dataset.
    async fn read_for_subscribe(
        &self,
        key: &DatasetKey,
        identity: &str,
        since: Option<u64>,
    ) -> Result<(Snapshot, Option<u64>), StoreError> {
        if let Some(since) = since {
            let changes = self.gw.store.changes(key, identity, since).await?;
            // A deleted dataset answers `changes` without its tombstones, and a client ahead
            // of the store holds a state the store never had: both get the whole dataset.
            if !changes.deleted && since <= changes.sync_count {
                return Ok((changes, Some(since)));
            }
        }
        Ok((self.gw.store.snapshot(key, identity).await?, None))
    }

    /// `unsubscribe`: acknowledged whether or not the session was subscribed.
    async fn unsubscribe(
        &mut self,
        id: RequestId,
        identity: &str,
        dataset: &DatasetRef,
    ) -> ServerFrame {
        match self.key(identity, dataset) {
            Ok(key) => {
                let key = Arc::new(key);
                self.drop_subscription(&key).await;
                ServerFrame::Ack {
                    id,
                    dataset: Some(key.to_ref()),
                    sync_count: None,
                    records: None,
                }
            }
            Err(e) => store_error(Some(id), &e),
        }
    }

    /// `update`: commits, acknowledges, then publishes. The ack is queued first so that the
    /// writer's own reply does not wait behind the fan-out of its commit; returns the reply
    /// when it is not an ack.
    async fn update(
        &mut self,
        id: RequestId,
        identity: &str,
        dataset: DatasetRef,
        device_id: Option<String>,
        patches: Vec<Patch>,
    ) -> Option<ServerFrame> {
        let key = match self.key(identity, &dataset) {
            Ok(key) => key,
            Err(e) => return Some(store_error(Some(id), &e)),
        };
        let patches = match crate::hook::check_update(
            &self.gw,
            identity,
            &key,
            device_id.as_deref(),
            patches,
        )
        .await
        {
            Ok(Checked::Commit(patches)) => patches,
            Ok(Checked::Rejected(message) | Checked::LambdaRejected(message)) => {
                return Some(ServerFrame::error(Some(id), ErrorCode::Rejected, message));
            }
            Ok(Checked::Unavailable(e)) => {
                return Some(ServerFrame::error(
                    Some(id),
                    ErrorCode::Unavailable,
                    e.to_string(),
                ));
            }
            Err(e) => return Some(store_error(Some(id), &e)),
        };
        let request = UpdateRequest {
            dataset: key,
            actor: identity.to_owned(),
            device_id,
            patches,
        };
        match self.gw.store.update(request).await {
            Ok(UpdateOutcome::Committed { changed, snapshot }) => {
                Metrics::add(&self.gw.metrics().commits, 1);
                let dataset = Arc::new(snapshot.dataset);
                let sync_count = snapshot.sync_count;
                self.reply(ServerFrame::Ack {
                    id,
                    dataset: Some(dataset.to_ref()),
                    sync_count: Some(sync_count),
                    records: Some(changed.clone()),
                });
                // Let the ack's writer, woken just now, run before the fan-out wakes every
                // subscriber's: the writer hears back first, not last.
                tokio::task::yield_now().await;
                self.gw
                    .hub
                    .publish_commit(dataset, sync_count, snapshot.records, changed)
                    .await;
                None
            }
            Ok(UpdateOutcome::Conflict {
                sync_count,
                conflicts,
            }) => {
                Metrics::add(&self.gw.metrics().conflicts, 1);
                Some(ServerFrame::Conflict {
                    id,
                    dataset: DatasetRef::new(
                        dataset.owner.as_deref().unwrap_or(identity),
                        dataset.name,
                    ),
                    sync_count,
                    conflicts,
                })
            }
            Err(e) => Some(store_error(Some(id), &e)),
        }
    }

    /// `changes`: the records changed since a sync count, tombstones included.
    async fn changes(
        &mut self,
        id: RequestId,
        identity: &str,
        dataset: &DatasetRef,
        since: u64,
    ) -> ServerFrame {
        let key = match self.key(identity, dataset) {
            Ok(key) => key,
            Err(e) => return store_error(Some(id), &e),
        };
        match self.gw.store.changes(&key, identity, since).await {
            Ok(snapshot) => ServerFrame::Changes {
                id,
                dataset: key.to_ref(),
                sync_count: snapshot.sync_count,
                records: snapshot.records,
            },
            Err(e) => store_error(Some(id), &e),
        }
    }

    /// `list_datasets`: the caller's own datasets.
    async fn list_datasets(&mut self, id: RequestId, identity: &str) -> ServerFrame {
        match self
            .gw
            .store
            .list_datasets(&self.gw.config.pool, identity)
            .await
        {
            Ok(datasets) => ServerFrame::Datasets { id, datasets },
            Err(e) => store_error(Some(id), &e),
        }
    }

    /// `delete_dataset`: deletes, tells every subscriber, then acknowledges.
    async fn delete(&mut self, id: RequestId, identity: &str, dataset: &DatasetRef) -> ServerFrame {
        let key = match self.key(identity, dataset) {
            Ok(key) => Arc::new(key),
            Err(e) => return store_error(Some(id), &e),
        };
        match self.gw.store.delete_dataset(&key, identity).await {
            Ok(sync_count) => {
                self.gw.hub.publish_deleted(key.clone(), sync_count).await;
                ServerFrame::Ack {
                    id,
                    dataset: Some(key.to_ref()),
                    sync_count: Some(sync_count),
                    records: None,
                }
            }
            Err(e) => store_error(Some(id), &e),
        }
    }

    /// `grant`: the owner shares the dataset.
    async fn grant(
        &mut self,
        id: RequestId,
        identity: &str,
        dataset: &DatasetRef,
        grantee: &str,
        access: Access,
    ) -> ServerFrame {
        let key = match self.key(identity, dataset) {
            Ok(key) => key,
            Err(e) => return store_error(Some(id), &e),
        };
        match self.gw.store.grant(&key, identity, grantee, access).await {
            Ok(()) => ack(id),
            Err(e) => store_error(Some(id), &e),
        }
    }

    /// `revoke`: takes effect at once, also for the grantee's live subscriptions.
    async fn revoke(
        &mut self,
        id: RequestId,
        identity: &str,
        dataset: &DatasetRef,
        grantee: String,
    ) -> ServerFrame {
        let key = match self.key(identity, dataset) {
            Ok(key) => Arc::new(key),
            Err(e) => return store_error(Some(id), &e),
        };
        match self.gw.store.revoke(&key, identity, &grantee).await {
            Ok(()) => {
                self.gw.hub.publish_revoked(key, grantee).await;
                ack(id)
            }
            Err(e) => store_error(Some(id), &e),
        }
    }

    /// `history`: a page of the dataset's commits, newest first.
    async fn history(
        &mut self,
        id: RequestId,
        identity: &str,
        dataset: &DatasetRef,
        before: Option<i64>,
        limit: Option<u32>,
    ) -> ServerFrame {
        let key = match self.key(identity, dataset) {
            Ok(key) => key,
            Err(e) => return store_error(Some(id), &e),
        };
        match crate::history::history(&self.gw, identity, &key, before, limit).await {
            Ok(page) => ServerFrame::History {
                id,
                dataset: key.to_ref(),
                sync_count: page.sync_count,
                entries: page.entries,
                next: page.next,
            },
            Err(e) => store_error(Some(id), &e),
        }
    }

    /// `read_at`: the dataset as it was at a sync count.
    async fn read_at(
        &mut self,
        id: RequestId,
        identity: &str,
        dataset: &DatasetRef,
        sync_count: u64,
    ) -> ServerFrame {
        let key = match self.key(identity, dataset) {
            Ok(key) => key,
            Err(e) => return store_error(Some(id), &e),
        };
        match self.gw.store.read_at(&key, identity, sync_count).await {
            Ok(snapshot) => ServerFrame::ReadAt {
                id,
                dataset: key.to_ref(),
                sync_count: snapshot.sync_count,
                records: snapshot.records,
            },
            Err(e) => store_error(Some(id), &e),
        }
    }

    /// `restore`: one new commit that makes the dataset what it was at a sync count.
    async fn restore(
        &mut self,
        id: RequestId,
        identity: &str,
        dataset: &DatasetRef,
        sync_count: u64,
        device_id: Option<String>,
    ) -> ServerFrame {
        let key = match self.key(identity, dataset) {
            Ok(key) => key,
            Err(e) => return store_error(Some(id), &e),
        };
        match crate::history::restore(&self.gw, identity, &key, sync_count, device_id).await {
            Ok(sync_count) => ServerFrame::Ack {
                id,
                dataset: Some(key.to_ref()),
                sync_count: Some(sync_count),
                records: None,
            },
            Err(e) => e.frame(Some(id)),
        }
    }
}
