//! Exponential backoff with jitter for reconnect and retry loops.

use std::time::Duration;

/// Doubles from `initial` up to `max`; each delay is drawn uniformly from
/// [50 %, 100 %] of the current step so that many clients that failed
/// together do not retry together.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            step: initial,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        step.mul_f64(rand::random_range(0.5..=1.0))
    }

    /// Back to `initial`, after a success.
    pub fn reset(&mut self) {
        self.step = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_max_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[1] >= Duration::from_millis(100) && d[1] <= Duration::from_millis(200));
        for x in &d[4..] {
            assert!(
                *x >= Duration::from_millis(500) && *x <= Duration::from_secs(1),
                "{x:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
