//! The change stream: every entry of the store's commit log, delivered after it committed,
//! at least once and in order per dataset, to the deployment's sinks — webhook endpoints
//! (signed `POST`s of event batches, retried with exponential backoff, then kept in the
//! store's dead letters) and a Redis Stream (`XADD` with a length cap, for consumer groups).
//! Each sink is a consumer of the log with its own position in the store; one node at a time
//! delivers for it, holding the consumer's lease in the store, and another node takes over
//! from the acknowledged position when that node dies. `tandem stream replay` puts the current
//! state of every dataset into the log, so the same sinks get it in order. See docs/HOOKS.md.

mod config;
mod deliver;
mod event;
mod sink;

pub use config::{StreamConfig, WebhookTarget, parse_webhook};
pub use deliver::{ChangeStream, ConsumerStats};
pub use event::{Event, encode_entry};
pub use sink::Sink;
/// The replay lives in the store crate, where the gateway's BulkPublish reaches it too.
pub use tandem_store::{ReplayReport, replay};
