//! A per-connection token bucket: `count` events per `window` on average, up to `count` at
//! once (one window's worth), so a burst is allowed but a steady flood is not. A session
//! keeps two: requests (`max_requests_per_second`: a client that reconnects and resubscribes
//! in a burst is served, one that floods the node is refused) and bad frames
//! (`max_bad_frames` per `bad_frames_window`: a client with a bug in one request keeps its
//! connection, one that sends little else is closed).

use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct RateLimiter {
    /// At most this many at once; 0 means unlimited.
    count: u32,
    /// Tokens added per second.
    refill: f64,
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    /// `count` per `window`; a count of 0 or an empty window means unlimited.
    pub(crate) fn new(count: u32, window: Duration) -> Self {
        let count = if window.is_zero() { 0 } else { count };
        RateLimiter {
            count,
            refill: f64::from(count) / window.as_secs_f64().max(f64::MIN_POSITIVE),
            tokens: f64::from(count),
            updated: Instant::now(),
        }
    }

    /// `rate` per second.
    pub(crate) fn per_second(rate: u32) -> Self {
        RateLimiter::new(rate, Duration::from_secs(1))
    }

    /// Takes one token, or says how long until one is available.
    pub(crate) fn take(&mut self) -> Result<(), Duration> {
        self.take_at(Instant::now())
    }

    fn take_at(&mut self, now: Instant) -> Result<(), Duration> {
        if self.count == 0 {
            return Ok(());
        }
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.refill).min(f64::from(self.count));
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.refill))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rate_limiter_allows_a_burst_of_rate_then_refills_at_rate() {
        let start = Instant::now();
        let mut limiter = RateLimiter::per_second(10);
        limiter.updated = start;
        for _ in 0..10 {
            assert!(limiter.take_at(start).is_ok());
        }
        let wait = limiter.take_at(start).unwrap_err();
        assert!(wait > Duration::from_millis(99) && wait <= Duration::from_millis(100));
        // A tenth of a second later exactly one more request fits.
        let later = start + Duration::from_millis(100);
        assert!(limiter.take_at(later).is_ok());
        assert!(limiter.take_at(later).is_err());
        // Idle time never banks more than one second's worth.
        let much_later = later + Duration::from_secs(60);
        let allowed = (0..100)
            .filter(|_| limiter.take_at(much_later).is_ok())
            .count();
        assert_eq!(allowed, 10);
    }

    #[test]
    fn test_rate_limiter_zero_means_unlimited() {
        let mut limiter = RateLimiter::per_second(0);
        assert!((0..100_000).all(|_| limiter.take().is_ok()));
        let mut limiter = RateLimiter::new(5, Duration::ZERO);
        assert!((0..100_000).all(|_| limiter.take().is_ok()));
    }

    #[test]
    fn test_rate_limiter_over_a_window_allows_a_steady_trickle_but_not_a_burst() {
        // 100 per 10 s: one bad frame a second forever is fine, 101 at once is not.
        let start = Instant::now();
        let mut limiter = RateLimiter::new(100, Duration::from_secs(10));
        limiter.updated = start;
        for s in 0..1000 {
            assert!(limiter.take_at(start + Duration::from_secs(s)).is_ok());
        }
        let now = start + Duration::from_secs(1000);
        let allowed = (0..200).filter(|_| limiter.take_at(now).is_ok()).count();
        assert_eq!(allowed, 100);
        // The next one fits after a tenth of the window.
        let wait = limiter.take_at(now).unwrap_err();
        assert!(wait > Duration::from_millis(99) && wait <= Duration::from_millis(100));
    }
}
