//! Node-level pub/sub for Tandem: the `Broker` trait that carries committed changes between
//! gateway nodes, its backends (`LocalBroker` in-process for one node; `RedisBroker` for
//! many), and `Channels`, the per-node refcount that keeps one broker subscription per
//! dataset channel while the node has local subscribers, however many clients share it.
//!
//! The broker is only a fast path: it may drop events during a fault and says so through
//! `EventHandler::on_resync`, after which the gateway re-reads the store. It knows nothing
//! of sessions or sockets; delivering to local connections is the gateway hub's job.

mod broker;
mod channels;
mod error;
mod local;
mod redis;

pub use self::redis::{DEFAULT_PREFIX, RedisBroker, RedisBrokerBuilder, RedisConfig};
pub use broker::{Broker, BrokerHealth, Event, EventHandler};
pub use channels::Channels;
pub use error::FanoutError;
pub use local::LocalBroker;
