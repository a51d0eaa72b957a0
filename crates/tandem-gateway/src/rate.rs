//! A per-connection token bucket for requests: `rate` requests per second on average, up to
//! `rate` at once (one second's worth), so a client that reconnects and resubscribes in a
//! burst is not refused, but one that floods the node is.

use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct RateLimiter {
    /// Requests per second; 0 means unlimited.
    rate: u32,
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    pub(crate) fn new(rate: u32) -> Self {
        RateLimiter {
            rate,
            tokens: f64::from(rate),
            updated: Instant::now(),
        }
    }

    /// Takes one request's token, or says how long until one is available.
    pub(crate) fn take(&mut self) -> Result<(), Duration> {
        self.take_at(Instant::now())
    }

    fn take_at(&mut self, now: Instant) -> Result<(), Duration> {
        if self.rate == 0 {
            return Ok(());
        }
        let rate = f64::from(self.rate);
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rate_limiter_allows_a_burst_of_rate_then_refills_at_rate() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(10);
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
        let mut limiter = RateLimiter::new(0);
        assert!((0..100_000).all(|_| limiter.take().is_ok()));
    }
}
