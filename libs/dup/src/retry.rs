//! What a session does after a failure, by the dup's fail mode (as in Pegasus):
//! `FAIL_SLOW` retries forever with backoff; `FAIL_SKIP` retries a bounded number of times, then
//! skips the batch and counts it; `FAIL_FAST` stops the dup and alerts.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    Slow,
    Skip,
    Fast,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Try again after this long.
    RetryAfter(Duration),
    /// Give up on this batch: count it as failed and move past it.
    SkipBatch,
    /// Stop shipping this dup; an operator must look.
    Stop,
}

/// Backoff state of one session.
#[derive(Debug, Clone)]
pub struct Retry {
    mode: FailMode,
    failures: u32,
    max_skip_attempts: u32,
    base: Duration,
    max: Duration,
}

impl Retry {
    pub fn new(mode: FailMode) -> Retry {
        Retry {
            mode,
            failures: 0,
            max_skip_attempts: 5,
            base: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }

    /// The fail mode can change while the session runs (`ferry dup set-fail-mode`).
    pub fn set_mode(&mut self, mode: FailMode) {
        self.mode = mode;
    }

    /// Call after each failure; says what to do.
    pub fn on_failure(&mut self) -> Action {
        self.failures = self.failures.saturating_add(1);
        match self.mode {
            FailMode::Fast => Action::Stop,
            FailMode::Skip if self.failures > self.max_skip_attempts => {
                self.failures = 0;
                Action::SkipBatch
            }
            FailMode::Slow | FailMode::Skip => Action::RetryAfter(self.backoff()),
        }
    }

    /// Call after a failure that no batch caused (the connection broke, the receiver could not
    /// be found): like [`Retry::on_failure`], but FAIL_SKIP never skips a batch for it.
    pub fn on_transport_failure(&mut self) -> Action {
        self.failures = self.failures.saturating_add(1);
        match self.mode {
            FailMode::Fast => Action::Stop,
            FailMode::Slow | FailMode::Skip => Action::RetryAfter(self.backoff()),
        }
    }

    fn backoff(&self) -> Duration {
        let exp = self.failures.saturating_sub(1).min(16);
        self.base.saturating_mul(1 << exp).min(self.max)
    }

    /// Call after a success: the next failure starts from the shortest backoff.
    pub fn on_success(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_backs_off_and_never_gives_up() {
        let mut r = Retry::new(FailMode::Slow);
        let waits: Vec<Action> = (0..10).map(|_| r.on_failure()).collect();
        assert_eq!(waits[0], Action::RetryAfter(Duration::from_millis(100)));
        assert_eq!(waits[1], Action::RetryAfter(Duration::from_millis(200)));
        assert_eq!(
            waits[9],
            Action::RetryAfter(Duration::from_secs(10)),
            "capped"
        );
        r.on_success();
        assert_eq!(
            r.on_failure(),
            Action::RetryAfter(Duration::from_millis(100))
        );
    }

    #[test]
    fn skip_gives_up_after_bounded_retries() {
        let mut r = Retry::new(FailMode::Skip);
        for _ in 0..5 {
            assert!(matches!(r.on_failure(), Action::RetryAfter(_)));
        }
        assert_eq!(r.on_failure(), Action::SkipBatch);
        assert!(
            matches!(r.on_failure(), Action::RetryAfter(_)),
            "the next batch gets its own retries"
        );
    }

    #[test]
    fn transport_failures_never_skip() {
        let mut r = Retry::new(FailMode::Skip);
        let waits: Vec<Action> = (0..20).map(|_| r.on_transport_failure()).collect();
        assert!(waits.iter().all(|a| matches!(a, Action::RetryAfter(_))));
        assert_eq!(waits[19], Action::RetryAfter(Duration::from_secs(10)));
        let mut r = Retry::new(FailMode::Fast);
        assert_eq!(r.on_transport_failure(), Action::Stop);
    }

    #[test]
    fn fast_stops_at_once() {
        let mut r = Retry::new(FailMode::Fast);
        assert_eq!(r.on_failure(), Action::Stop);
    }
}
