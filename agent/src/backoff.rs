//! How long to wait after the `failures`-th failure in a row: sources, the rollout loop and the
//! node-facing clients all back off the same way.

use std::time::Duration;

/// Exponential backoff from 1 s to 5 min, with ±50% jitter so fleets do not poll in step.
pub fn delay(failures: u32) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1u32 << failures.saturating_sub(1).min(9));
    let capped = base.min(Duration::from_secs(300));
    capped.mul_f64(0.5 + fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters() {
        for failures in 1..20 {
            let d = delay(failures);
            assert!(d <= Duration::from_secs(450), "{failures}: {d:?}");
            assert!(d >= Duration::from_millis(500));
        }
        assert!(delay(10) > Duration::from_secs(100));
    }
}
