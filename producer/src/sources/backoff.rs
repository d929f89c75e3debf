//! Exponential backoff with full jitter, and a sliding-window limit on
//! connection attempts (Binance allows 300 per 5 minutes per IP).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::Rng;

/// Delays that double from `base` up to `max`, each drawn uniformly below the
/// current ceiling, so that many clients do not reconnect in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max, attempt: 0 }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.base.saturating_mul(1u32 << self.attempt.min(16)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let ms = ceiling.as_millis().max(1) as u64;
        Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
    }

    /// Back to the shortest delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// At most `max` attempts in any `window`.
#[derive(Debug)]
pub struct AttemptLimit {
    max: usize,
    window: Duration,
    recent: VecDeque<Instant>,
}

impl AttemptLimit {
    pub fn new(max: usize, window: Duration) -> Self {
        AttemptLimit {
            max: max.max(1),
            window,
            recent: VecDeque::new(),
        }
    }

    /// How long to wait before the next attempt is allowed (zero if now), and
    /// records the attempt as made at that time.
    pub fn reserve(&mut self, now: Instant) -> Duration {
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            self.recent.pop_front();
        }
        let at = if self.recent.len() >= self.max {
            self.recent[self.recent.len() - self.max] + self.window
        } else {
            now
        };
        self.recent.push_back(at);
        at.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[7] >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn attempts_beyond_the_window_limit_wait() {
        let t0 = Instant::now();
        let mut l = AttemptLimit::new(3, Duration::from_secs(300));
        assert_eq!(l.reserve(t0), Duration::ZERO);
        assert_eq!(l.reserve(t0), Duration::ZERO);
        assert_eq!(l.reserve(t0 + Duration::from_secs(10)), Duration::ZERO);
        // The fourth within five minutes waits until the first leaves the window.
        assert_eq!(l.reserve(t0 + Duration::from_secs(20)), Duration::from_secs(280));
        assert_eq!(l.reserve(t0 + Duration::from_secs(21)), Duration::from_secs(279));
    }
}
