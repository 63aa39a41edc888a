//! Live-gated promotion: a new model version first serves a canary slice of the users, and the
//! prequential hit rate decides whether it goes live. This module is what every role shares:
//! which users are in a canary's slice (`in_slice`, the same on every replica), the evidence a
//! serving process counts per canary (`Tally`: trials and hits of the canary's slice and of the
//! live model on everyone else, over the same time), and the sequential test that turns the
//! evidence into a decision (`sequential`). Where the evidence travels (a fleet's models topic)
//! and who decides (the trainer) live in `shipping` and `train`.

mod sequential;

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

pub use sequential::{normal_quantile, Arm, Interval, TestSettings, Verdict, MIXTURE_SCALE};

/// Whether the user with external id `user` is in the slice of canary `version` that takes
/// `fraction` of the users: a hash of the user's lifelong key and the version, so the slice is
/// the same on every replica and over the canary's life, and each canary draws its own.
pub fn in_slice(user: &str, version: u64, fraction: f64) -> bool {
    let key = crate::store::user_key(user.as_bytes());
    let h = crate::model::splitmix(key ^ crate::model::splitmix(version));
    ((h >> 11) as f64) / ((1u64 << 53) as f64) < fraction
}

/// Which model a recommendation came from while a canary runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The canary, on its slice.
    Canary,
    /// The live model, on the users outside the slice.
    Live,
}

/// A canary's evidence: its slice's arm and the live model's arm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub canary: Arm,
    pub live: Arm,
}

impl Evidence {
    /// Both arms added (another process's counts).
    pub fn plus(self, other: Evidence) -> Evidence {
        Evidence {
            canary: self.canary.plus(other.canary),
            live: self.live.plus(other.live),
        }
    }

    /// Shows the counts in `multivaed_canary_trials` and `multivaed_canary_hits`, by side.
    pub(crate) fn show_in(&self, m: &crate::metrics::Metrics) {
        for (side, arm) in [("canary", self.canary), ("live", self.live)] {
            m.canary_trials
                .with_label_values(&[side])
                .set(arm.trials as i64);
            m.canary_hits
                .with_label_values(&[side])
                .set(arm.hits as i64);
        }
    }

    /// Whether the counts are possible: no more hits than trials.
    pub fn is_consistent(&self) -> bool {
        self.canary.hits <= self.canary.trials && self.live.hits <= self.live.trials
    }
}

/// What became of a canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decided {
    /// It went live, for everyone.
    Promote,
    /// It was rolled back: its slice went back to the live version.
    Reject,
}

impl Decided {
    pub fn as_str(self) -> &'static str {
        match self {
            Decided::Promote => "promote",
            Decided::Reject => "reject",
        }
    }
}

/// Canary versions whose evidence one process keeps, at most (the newest).
const MAX_VERSIONS: usize = 16;

/// The evidence this process counted, per canary version, cumulative over its life.
#[derive(Default)]
pub struct Tally {
    by_version: Mutex<BTreeMap<u64, Evidence>>,
}

impl Tally {
    /// Counts one trial of `side` of canary `version`: a hit when the click was in its top 10.
    pub fn record(&self, version: u64, side: Side, hit: bool) {
        let mut g = self.by_version.lock().unwrap_or_else(|e| e.into_inner());
        let e = g.entry(version).or_default();
        let arm = match side {
            Side::Canary => &mut e.canary,
            Side::Live => &mut e.live,
        };
        *arm = arm.plus(Arm {
            trials: 1,
            hits: u64::from(hit),
        });
        while g.len() > MAX_VERSIONS {
            g.pop_first();
        }
    }

    /// The evidence of canary `version` so far.
    pub fn get(&self, version: u64) -> Evidence {
        let g = self.by_version.lock().unwrap_or_else(|e| e.into_inner());
        g.get(&version).copied().unwrap_or_default()
    }

    /// Every canary version's evidence so far.
    pub fn snapshot(&self) -> BTreeMap<u64, Evidence> {
        self.by_version
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_holds_its_fraction_of_users_and_differs_between_canaries() {
        let users: Vec<String> = (0..20_000).map(|u| format!("user-{u}")).collect();
        let share = |v: u64, f: f64| {
            users.iter().filter(|u| in_slice(u, v, f)).count() as f64 / users.len() as f64
        };
        for f in [0.01, 0.1, 0.5] {
            let s = share(7, f);
            assert!((s - f).abs() < 0.01 + f * 0.1, "fraction {f}: {s}");
        }
        assert_eq!(share(7, 0.0), 0.0);
        assert_eq!(share(7, 1.0), 1.0);
        let both = users
            .iter()
            .filter(|u| in_slice(u, 7, 0.1) && in_slice(u, 8, 0.1))
            .count() as f64
            / users.len() as f64;
        assert!(both < 0.02, "two canaries' slices overlap by {both}");
        // a user stays in (or out of) a canary's slice
        assert!(users
            .iter()
            .all(|u| in_slice(u, 7, 0.1) == in_slice(u, 7, 0.1)));
    }

    #[test]
    fn the_tally_counts_each_side_and_keeps_the_newest_versions() {
        let t = Tally::default();
        t.record(3, Side::Canary, true);
        t.record(3, Side::Canary, false);
        t.record(3, Side::Live, true);
        assert_eq!(
            t.get(3),
            Evidence {
                canary: Arm { trials: 2, hits: 1 },
                live: Arm { trials: 1, hits: 1 },
            }
        );
        for v in 10..40 {
            t.record(v, Side::Live, false);
        }
        assert_eq!(t.snapshot().len(), MAX_VERSIONS);
        assert_eq!(t.get(3), Evidence::default(), "the oldest is dropped");
    }
}
