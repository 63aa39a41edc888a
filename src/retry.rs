//! The one pace of every retry loop: exponential backoff with jitter (backon), from a first
//! wait up to a ceiling, for as long as the loop's own condition (shutdown, a deadline) allows.

use std::time::Duration;

use backon::BackoffBuilder;

/// The waits before each retry: doubling from `first`, each jittered, at most `max`, endless.
pub fn backoff(first: Duration, max: Duration) -> impl Iterator<Item = Duration> + Send {
    let waits = backon::ExponentialBuilder::default()
        .with_min_delay(first)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build();
    waits.map(move |w| w.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_ceiling_and_never_end() {
        let waits: Vec<Duration> = backoff(Duration::from_millis(100), Duration::from_secs(1))
            .take(20)
            .collect();
        assert_eq!(waits.len(), 20);
        assert!(waits[0] >= Duration::from_millis(100) && waits[0] < Duration::from_millis(250));
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(1)));
        assert!(waits[19] >= Duration::from_millis(900), "{waits:?}");
    }
}
