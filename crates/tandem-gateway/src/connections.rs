//! Open connections on this node: in all (`max_connections`), not yet authenticated
//! (`max_unauthenticated_connections`), per peer IP address (`max_connections_per_ip`, and
//! `max_new_connections_per_ip` per second), all counted from the upgrade request on so a
//! burst cannot overshoot; and per identity, so that one identity (one leaked token, one
//! runaway client) cannot hold the node's connections (`max_connections_per_identity`).

use crate::config::GatewayConfig;
use crate::rate::RateLimiter;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tandem_protocol::LimitCode;

/// Peer addresses remembered for the per-IP limits; past this, addresses without open
/// connections are forgotten (and get a fresh burst when they come back).
const MAX_TRACKED_IPS: usize = 65_536;

#[derive(Debug)]
pub(crate) struct Connections {
    open: Arc<AtomicUsize>,
    max_open: usize,
    unauthenticated: Arc<AtomicUsize>,
    max_unauthenticated: usize,
    per_ip: Arc<Mutex<HashMap<IpAddr, PerIp>>>,
    max_per_ip: usize,
    new_per_ip: u32,
    ip_exempt: Vec<IpAddr>,
    per_identity: Mutex<HashMap<Arc<str>, usize>>,
    max_per_identity: usize,
}

#[derive(Debug)]
struct PerIp {
    open: usize,
    new: RateLimiter,
}

/// A counted connection; every count it holds is given back when it is dropped.
#[derive(Debug)]
pub(crate) struct Admitted {
    _open: Counted,
    _ip: Option<IpSlot>,
    unauthenticated: Option<Counted>,
}

impl Admitted {
    /// The connection authenticated: it no longer counts as unauthenticated.
    pub(crate) fn authenticated(&mut self) {
        self.unauthenticated = None;
    }
}

#[derive(Debug)]
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
struct IpSlot {
    map: Arc<Mutex<HashMap<IpAddr, PerIp>>>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.map.lock();
        if let Some(entry) = map.get_mut(&self.ip) {
            entry.open = entry.open.saturating_sub(1);
        }
    }
}

/// Why a connection was refused: the limit, its value, and the wait a retry needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    pub limit: LimitCode,
    pub max: u64,
    pub retry_after: Option<Duration>,
}

fn count(counter: &Arc<AtomicUsize>, max: usize, limit: LimitCode) -> Result<Counted, Refused> {
    let previous = counter.fetch_add(1, Ordering::AcqRel);
    let counted = Counted(counter.clone());
    if previous >= max {
        return Err(Refused {
            limit,
            max: max as u64,
            retry_after: None,
        });
    }
    Ok(counted)
}

impl Connections {
    pub(crate) fn new(config: &GatewayConfig) -> Self {
        Connections {
            open: Arc::new(AtomicUsize::new(0)),
            max_open: config.max_connections,
            unauthenticated: Arc::new(AtomicUsize::new(0)),
            max_unauthenticated: config.max_unauthenticated_connections,
            per_ip: Arc::new(Mutex::new(HashMap::new())),
            max_per_ip: config.max_connections_per_ip,
            new_per_ip: config.max_new_connections_per_ip,
            ip_exempt: config.ip_limits_exempt.clone(),
            per_identity: Mutex::new(HashMap::new()),
            max_per_identity: config.max_connections_per_identity,
        }
    }

    /// Counts a new connection from `ip`, already authenticated (by a header) or not, or
    /// says which limit refuses it.
    /// `ip` is `None` when the node was served without [`crate::Listener`] (no per-IP limits).
    pub(crate) fn admit(
        &self,
        ip: Option<IpAddr>,
        authenticated: bool,
    ) -> Result<Admitted, Refused> {
        let open = count(&self.open, self.max_open, LimitCode::MaxConnections)?;
        let unauthenticated = if authenticated {
            None
        } else {
            Some(count(
                &self.unauthenticated,
                self.max_unauthenticated,
                LimitCode::MaxUnauthenticatedConnections,
            )?)
        };
        let ip = match ip {
            Some(ip) if !self.ip_exempt.contains(&ip) => Some(self.admit_ip(ip)?),
            _ => None,
        };
        Ok(Admitted {
            _open: open,
            _ip: ip,
            unauthenticated,
        })
    }

    fn admit_ip(&self, ip: IpAddr) -> Result<IpSlot, Refused> {
        let mut map = self.per_ip.lock();
        if map.len() >= MAX_TRACKED_IPS && !map.contains_key(&ip) {
            map.retain(|_, e| e.open > 0);
        }
        let entry = map.entry(ip).or_insert_with(|| PerIp {
            open: 0,
            new: RateLimiter::per_second(self.new_per_ip),
        });
        if entry.open >= self.max_per_ip {
            return Err(Refused {
                limit: LimitCode::MaxConnectionsPerIp,
                max: self.max_per_ip as u64,
                retry_after: None,
            });
        }
        if let Err(wait) = entry.new.take() {
            return Err(Refused {
                limit: LimitCode::MaxNewConnectionsPerIp,
                max: u64::from(self.new_per_ip),
                retry_after: Some(wait),
            });
        }
        entry.open += 1;
        Ok(IpSlot {
            map: self.per_ip.clone(),
            ip,
        })
    }

    /// Counts one more session for `identity`, unless it already holds the maximum.
    pub(crate) fn acquire(&self, identity: &Arc<str>) -> bool {
        let mut map = self.per_identity.lock();
        let count = map.entry(identity.clone()).or_insert(0);
        if *count >= self.max_per_identity {
            if *count == 0 {
                map.remove(identity);
            }
            return false;
        }
        *count += 1;
        true
    }

    /// Gives back a session counted by `acquire`.
    pub(crate) fn release(&self, identity: &str) {
        let mut map = self.per_identity.lock();
        if let Some(count) = map.get_mut(identity) {
            *count -= 1;
            if *count == 0 {
                map.remove(identity);
            }
        }
    }

    /// Identities with open sessions (a bounded map: entries leave with their last session).
    #[cfg(test)]
    pub(crate) fn identities(&self) -> usize {
        self.per_identity.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(f: impl FnOnce(&mut GatewayConfig)) -> GatewayConfig {
        let mut config = GatewayConfig {
            ip_limits_exempt: Vec::new(),
            ..GatewayConfig::default()
        };
        f(&mut config);
        config
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    #[test]
    fn test_connections_bound_open_and_unauthenticated_connections() {
        let c = Connections::new(&config(|c| {
            c.max_connections = 3;
            c.max_unauthenticated_connections = 1;
        }));
        let mut a = c.admit(Some(ip(1)), false).unwrap();
        let refused = c.admit(Some(ip(2)), false).unwrap_err();
        assert_eq!(refused.limit, LimitCode::MaxUnauthenticatedConnections);
        a.authenticated();
        let _b = c.admit(Some(ip(2)), false).unwrap();
        let _c = c.admit(Some(ip(3)), true).unwrap();
        assert_eq!(
            c.admit(Some(ip(4)), true).unwrap_err().limit,
            LimitCode::MaxConnections
        );
        drop(a);
        assert!(c.admit(Some(ip(4)), true).is_ok());
    }

    #[test]
    fn test_connections_bound_each_ip_but_not_exempt_ones() {
        let c = Connections::new(&config(|c| {
            c.max_connections_per_ip = 2;
            c.max_new_connections_per_ip = 3;
            c.ip_limits_exempt = vec![ip(9)];
        }));
        let a = c.admit(Some(ip(1)), true).unwrap();
        let _b = c.admit(Some(ip(1)), true).unwrap();
        assert_eq!(
            c.admit(Some(ip(1)), true).unwrap_err().limit,
            LimitCode::MaxConnectionsPerIp
        );
        drop(a);
        let _c = c.admit(Some(ip(1)), true).unwrap();
        // Three new connections this second were taken; the fourth waits.
        drop(_c);
        let refused = c.admit(Some(ip(1)), true).unwrap_err();
        assert_eq!(refused.limit, LimitCode::MaxNewConnectionsPerIp);
        assert!(refused.retry_after.is_some());
        assert!(c.admit(Some(ip(2)), true).is_ok());
        for _ in 0..10 {
            assert!(c.admit(Some(ip(9)), true).is_ok());
        }
    }

    #[test]
    fn test_connections_bound_sessions_per_identity() {
        let c = Connections::new(&config(|c| c.max_connections_per_identity = 2));
        let a: Arc<str> = Arc::from("a");
        assert!(c.acquire(&a));
        assert!(c.acquire(&a));
        assert!(!c.acquire(&a));
        assert!(c.acquire(&Arc::from("b")));
        c.release("a");
        assert!(c.acquire(&a));
        c.release("a");
        c.release("a");
        c.release("b");
        assert_eq!(c.identities(), 0);
        let none = Connections::new(&config(|c| c.max_connections_per_identity = 0));
        assert!(!none.acquire(&a));
        assert_eq!(none.identities(), 0);
    }
}
