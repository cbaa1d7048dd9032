//! How long a watcher waits before dialling a cluster again.
//!
//! Delays grow exponentially from [`ReconnectBackoff::initial`] up to
//! [`ReconnectBackoff::max`] (the sequence comes from the `backon` crate), and each one is
//! then scaled by a random factor in [0.5, 1): "equal jitter" (M. Brooker, "Exponential
//! Backoff And Jitter", AWS Architecture Blog, 2015). Jitter is applied after the cap, so
//! agents that have all reached the cap still spread their retries over [max/2, max)
//! instead of retrying in step at `max`. backon's own jitter adds up to one more delay on
//! top ([d, 2d)), which would break the cap, so it is not used.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Reconnect policy of a watcher: the first and the largest delay, before jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectBackoff {
    /// First delay (before jitter).
    pub initial: Duration,
    /// Largest delay (before jitter).
    pub max: Duration,
}

impl Default for ReconnectBackoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

impl ReconnectBackoff {
    /// The delays before each retry of one run of failed sessions, the first retry first;
    /// endless.
    #[must_use]
    pub fn delays(&self) -> ReconnectDelays<StdRng> {
        self.delays_with(StdRng::from_entropy())
    }

    /// [`Self::delays`] with the given random source.
    pub fn delays_with<R: Rng>(&self, rng: R) -> ReconnectDelays<R> {
        ReconnectDelays {
            steps: ExponentialBuilder::new()
                .with_factor(2.0)
                .with_min_delay(self.initial)
                .with_max_delay(self.max)
                .without_max_times()
                .build(),
            max: self.max,
            rng,
        }
    }

    /// Delay before retrying a refused cluster: the cap, jittered like any other delay,
    /// with the given random source.
    #[must_use]
    pub fn refused_delay(&self, rng: &mut impl Rng) -> Duration {
        jitter(self.max, rng)
    }
}

/// The jittered delays of one run of failures (see [`ReconnectBackoff::delays`]).
#[derive(Debug)]
pub struct ReconnectDelays<R> {
    steps: ExponentialBackoff,
    max: Duration,
    rng: R,
}

impl<R: Rng> Iterator for ReconnectDelays<R> {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // backon stops after usize::MAX steps; the cap applies from long before that.
        let base = self.steps.next().unwrap_or(self.max).min(self.max);
        Some(jitter(base, &mut self.rng))
    }
}

/// `base` scaled by a uniform factor in [0.5, 1).
fn jitter(base: Duration, rng: &mut impl Rng) -> Duration {
    base.mul_f64(rng.gen_range(0.5..1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let b = ReconnectBackoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let mut delays = b.delays_with(&mut rng);
            let d1 = delays.next().unwrap();
            assert!(d1 >= Duration::from_millis(50) && d1 < Duration::from_millis(100));
            let d4 = delays.nth(2).unwrap();
            assert!(d4 >= Duration::from_millis(400) && d4 < Duration::from_millis(800));
        }
    }

    /// At the cap (and for refused clusters) delays still spread over [max/2, max): agents
    /// that lost the same server retry at different times, not in step at `max`.
    #[test]
    fn capped_and_refused_delays_stay_spread() {
        let b = ReconnectBackoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let mut rng = StdRng::seed_from_u64(42);
        for delays in [
            b.delays_with(&mut rng)
                .skip(39)
                .take(1000)
                .collect::<Vec<_>>(),
            (0..1000)
                .map(|_| b.refused_delay(&mut rng))
                .collect::<Vec<_>>(),
        ] {
            assert!(delays
                .iter()
                .all(|d| *d >= Duration::from_secs(1) && *d < Duration::from_secs(2)));
            let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
            assert!(distinct.len() > 990, "{} distinct delays", distinct.len());
            // Each quarter of [1 s, 2 s) gets roughly a quarter of the delays.
            for q in 0..4u32 {
                let lo = Duration::from_millis(1000 + 250 * u64::from(q));
                let hi = lo + Duration::from_millis(250);
                let n = delays.iter().filter(|d| **d >= lo && **d < hi).count();
                assert!((200..300).contains(&n), "quarter {q}: {n} of 1000");
            }
        }
    }
}
