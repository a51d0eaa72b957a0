//! Open connections on this node, in all (`max_connections`, counted from the upgrade
//! request on, so a burst of upgrades cannot overshoot) and per identity, so that one
//! identity (one leaked token, one runaway client) cannot hold the node's connections
//! (`max_connections_per_identity`).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub(crate) struct Connections {
    open: Arc<AtomicUsize>,
    max_open: usize,
    per_identity: Mutex<HashMap<Arc<str>, usize>>,
    max_per_identity: usize,
}

/// One open connection, counted until dropped.
#[derive(Debug)]
pub(crate) struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Connections {
    pub(crate) fn new(max_open: usize, max_per_identity: usize) -> Self {
        Connections {
            open: Arc::new(AtomicUsize::new(0)),
            max_open,
            per_identity: Mutex::new(HashMap::new()),
            max_per_identity,
        }
    }

    /// Counts one more connection, unless the node already serves `max_connections`.
    pub(crate) fn open(&self) -> Option<Open> {
        let previous = self.open.fetch_add(1, Ordering::AcqRel);
        let open = Open(self.open.clone());
        (previous < self.max_open).then_some(open)
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

    #[test]
    fn test_connections_bound_open_connections() {
        let c = Connections::new(2, 10);
        let a = c.open().unwrap();
        let _b = c.open().unwrap();
        assert!(c.open().is_none());
        drop(a);
        assert!(c.open().is_some());
    }

    #[test]
    fn test_connections_bound_sessions_per_identity() {
        let c = Connections::new(10, 2);
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
        let none = Connections::new(10, 0);
        assert!(!none.acquire(&a));
        assert_eq!(none.identities(), 0);
    }
}
