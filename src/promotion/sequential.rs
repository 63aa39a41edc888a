//! The sequential test that decides a canary, safe to look at after every click: an
//! always-valid confidence sequence for the non-inferiority contrast
//!
//! ```text
//! θ = p_canary − (1 − m) · p_live          (m: promotion.margin, relative)
//! ```
//!
//! from the mixture sequential probability ratio test with a normal mixing distribution
//! N(0, τ²) (Robbins 1970; Johari, Pekelis & Walsh, "Always Valid Inference: Continuous
//! Monitoring of A/B Tests", Operations Research 70(3), 2022, eq. 12):
//!
//! ```text
//! θ̂ ± sqrt( V (V + τ²) / τ² · ( ln((V + τ²) / V) + 2 ln(1/α) ) )
//! V = p̃c (1 − p̃c) / nc + (1 − m)² p̃l (1 − p̃l) / nl,   p̃ = (hits + 1) / (trials + 2)
//! ```
//!
//! covers θ at every look at once with probability ≥ 1 − α (in the normal approximation). The
//! canary is promoted once the whole interval is above 0 (it is no worse than the live model by
//! more than the margin) and rolled back once it is below 0 (worse by more than the margin);
//! neither before both arms reach `min_trials` and the two together `min_hits`.

use serde::{Deserialize, Serialize};

/// Trials (clicks of users shown an arm's recommendation) and hits (the click was in its top
/// 10) of one arm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arm {
    pub trials: u64,
    pub hits: u64,
}

impl Arm {
    /// The hit rate (0 without trials).
    pub fn rate(&self) -> f64 {
        if self.trials == 0 {
            0.0
        } else {
            self.hits as f64 / self.trials as f64
        }
    }

    /// Both counts added (saturating: counts come from other processes).
    pub fn plus(self, other: Arm) -> Arm {
        Arm {
            trials: self.trials.saturating_add(other.trials),
            hits: self.hits.saturating_add(other.hits),
        }
    }

    /// The shrunk rate whose variance is never zero.
    fn smoothed(&self) -> f64 {
        (self.hits as f64 + 1.0) / (self.trials as f64 + 2.0)
    }
}

/// The test's settings (`promotion.*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TestSettings {
    /// Error rate of either decision.
    pub alpha: f64,
    /// The relative drop of the hit rate still accepted as "no worse".
    pub margin: f64,
    /// Trials each arm needs before any decision.
    pub min_trials: u64,
    /// Hits both arms together need before any decision.
    pub min_hits: u64,
}

impl Default for TestSettings {
    fn default() -> Self {
        Self::of(&crate::config::PromotionConfig::default())
    }
}

/// The mixing distribution's scale τ, in hit-rate points: the test is tightest for contrasts of
/// about this size (hit rates at 10 of a few percent to a few tens of percent).
pub const MIXTURE_SCALE: f64 = 0.02;

/// What the evidence says now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// No worse than the live model by more than the margin.
    Promote,
    /// Worse by more than the margin.
    Reject,
    Undecided,
}

/// The estimate of θ and its always-valid interval at this look.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub estimate: f64,
    pub lower: f64,
    pub upper: f64,
}

impl TestSettings {
    /// The settings of `promotion.*`.
    pub fn of(c: &crate::config::PromotionConfig) -> Self {
        Self {
            alpha: c.alpha,
            margin: c.margin,
            min_trials: c.min_trials,
            min_hits: c.min_hits,
        }
    }

    /// θ's estimate and interval from the two arms' counts.
    pub fn interval(&self, canary: Arm, live: Arm) -> Interval {
        let keep = 1.0 - self.margin;
        let estimate = canary.rate() - keep * live.rate();
        let var = |a: &Arm| {
            let p = a.smoothed();
            p * (1.0 - p) / (a.trials.max(1) as f64)
        };
        let v = var(&canary) + keep * keep * var(&live);
        let half = half_width(v, self.alpha);
        Interval {
            estimate,
            lower: estimate - half,
            upper: estimate + half,
        }
    }

    /// Whether both arms have counted enough for a decision.
    pub fn enough(&self, canary: Arm, live: Arm) -> bool {
        canary.trials >= self.min_trials
            && live.trials >= self.min_trials
            && canary.hits.saturating_add(live.hits) >= self.min_hits
    }

    /// The decision the counts support now.
    pub fn verdict(&self, canary: Arm, live: Arm) -> Verdict {
        if !self.enough(canary, live) {
            return Verdict::Undecided;
        }
        let i = self.interval(canary, live);
        if i.lower > 0.0 {
            Verdict::Promote
        } else if i.upper < 0.0 {
            Verdict::Reject
        } else {
            Verdict::Undecided
        }
    }

    /// The trials (both arms together, `fraction` of them the canary's) after which the test
    /// decides with probability `power`, for true hit rates `canary` and `live`: the first n
    /// where |θ| ≥ half-width(n) + z_power·√V(n). `None` when θ is 0 or beyond 10¹² trials.
    pub fn trials_to_decide(
        &self,
        canary: f64,
        live: f64,
        fraction: f64,
        power: f64,
    ) -> Option<u64> {
        let keep = 1.0 - self.margin;
        let theta = (canary - keep * live).abs();
        let z = normal_quantile(power);
        let decided = |n: f64| {
            let (nc, nl) = (n * fraction, n * (1.0 - fraction));
            let v = canary * (1.0 - canary) / nc + keep * keep * live * (1.0 - live) / nl;
            theta >= half_width(v, self.alpha) + z * v.sqrt()
        };
        let mut hi = 16.0;
        while !decided(hi) {
            hi *= 2.0;
            if hi > 1e12 {
                return None;
            }
        }
        let mut lo = hi / 2.0;
        while hi - lo > 1.0 {
            let mid = (lo + hi) / 2.0;
            if decided(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi.ceil() as u64)
    }
}

/// The mixture boundary's half-width for an estimate of variance `v`.
fn half_width(v: f64, alpha: f64) -> f64 {
    let t2 = MIXTURE_SCALE * MIXTURE_SCALE;
    (v * (v + t2) / t2 * (((v + t2) / v).ln() + 2.0 * (1.0 / alpha).ln())).sqrt()
}

/// The standard normal quantile (Acklam's rational approximation, |error| < 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383_577_518_672_69e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use rand_distr::{Binomial, Distribution};

    use super::*;

    /// Canary share of the trials, as `promotion.canary_fraction`'s default.
    const FRACTION: f64 = 0.1;
    /// Trials (both arms) between two looks.
    const LOOK: u64 = 500;
    const RUNS: usize = 1000;

    /// One simulated canary: Bernoulli streams of hit rates `canary` and `live`, looked at
    /// every [`LOOK`] trials until `rule` decides or `horizon` trials; the verdict and the
    /// trials it took.
    fn run(
        rule: &dyn Fn(Arm, Arm) -> Verdict,
        (canary, live): (f64, f64),
        horizon: u64,
        rng: &mut StdRng,
    ) -> (Verdict, u64) {
        let (mut c, mut l) = (Arm::default(), Arm::default());
        let mut n = 0;
        while n < horizon {
            let nc = Binomial::new(LOOK, FRACTION).unwrap().sample(rng);
            let nl = LOOK - nc;
            c = c.plus(Arm {
                trials: nc,
                hits: Binomial::new(nc, canary).unwrap().sample(rng),
            });
            l = l.plus(Arm {
                trials: nl,
                hits: Binomial::new(nl, live).unwrap().sample(rng),
            });
            n += LOOK;
            match rule(c, l) {
                Verdict::Undecided => {}
                v => return (v, n),
            }
        }
        (Verdict::Undecided, n)
    }

    /// The verdicts of [`RUNS`] runs and the trials each took.
    fn runs(
        rule: &dyn Fn(Arm, Arm) -> Verdict,
        rates: (f64, f64),
        horizon: u64,
        seed: u64,
    ) -> Vec<(Verdict, u64)> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..RUNS)
            .map(|_| {
                let mut r = StdRng::seed_from_u64(rng.gen());
                run(rule, rates, horizon, &mut r)
            })
            .collect()
    }

    fn share(runs: &[(Verdict, u64)], v: Verdict, within: u64) -> f64 {
        runs.iter().filter(|(x, n)| *x == v && *n <= within).count() as f64 / runs.len() as f64
    }

    const P: f64 = 0.1;
    /// Past the trials a canary worse by twice the margin needs at 90% power (≈ 0.8 M).
    const HORIZON: u64 = 2_000_000;

    #[test]
    fn equal_hit_rates_are_rolled_back_at_most_alpha_of_the_time_however_often_looked_at() {
        let s = TestSettings::default();
        let rule = |c, l| s.verdict(c, l);
        let runs = runs(&rule, (P, P), HORIZON, 1);
        let false_rollbacks = share(&runs, Verdict::Reject, u64::MAX);
        let promoted = share(&runs, Verdict::Promote, u64::MAX);
        println!("equal rates: false rollbacks {false_rollbacks}, promoted {promoted}");
        assert!(
            false_rollbacks <= s.alpha,
            "false rollbacks {false_rollbacks} > α {} over {RUNS} runs",
            s.alpha
        );
        assert!(
            promoted >= 0.8,
            "an equal canary promoted in only {promoted} of runs"
        );
    }

    #[test]
    fn a_canary_worse_by_twice_the_margin_is_rolled_back_within_the_predicted_trials() {
        let s = TestSettings::default();
        let worse = P * (1.0 - 2.0 * s.margin);
        let predicted = s.trials_to_decide(worse, P, FRACTION, 0.9).unwrap();
        // the prediction, for the docs: ≈ 0.8 M trials at a hit rate of 0.1, 10 % slice
        assert!((500_000..1_200_000).contains(&predicted), "{predicted}");
        let rule = |c, l| s.verdict(c, l);
        let runs = runs(&rule, (worse, P), HORIZON, 2);
        let rolled_back = share(&runs, Verdict::Reject, predicted + LOOK);
        println!("worse by 2 margins: rolled back within {predicted} trials in {rolled_back}");
        // 90 % power predicted; the sequential test may stop earlier, never later by design
        assert!(
            rolled_back >= 0.85,
            "rolled back within {predicted} trials in {rolled_back} of runs"
        );
        assert!(share(&runs, Verdict::Promote, u64::MAX) <= s.alpha);
    }

    #[test]
    fn a_better_canary_is_promoted() {
        let s = TestSettings::default();
        let better = P * 1.1;
        let predicted = s.trials_to_decide(better, P, FRACTION, 0.9).unwrap();
        let rule = |c, l| s.verdict(c, l);
        let runs = runs(&rule, (better, P), HORIZON, 3);
        let promoted = share(&runs, Verdict::Promote, predicted + LOOK);
        println!("10 % better: promoted within {predicted} trials in {promoted}");
        assert!(
            promoted >= 0.85,
            "promoted within {predicted} trials in {promoted} of runs"
        );
        assert_eq!(share(&runs, Verdict::Reject, u64::MAX), 0.0);
    }

    #[test]
    fn a_fixed_sample_test_looked_at_continuously_rolls_back_equal_canaries_too_often() {
        let s = TestSettings::default();
        let z = normal_quantile(1.0 - s.alpha);
        // the one-sided z-test a fixed sample size would allow, applied at every look
        let peeked = |c: Arm, l: Arm| {
            if !s.enough(c, l) {
                return Verdict::Undecided;
            }
            let keep = 1.0 - s.margin;
            let var = |a: &Arm| a.rate() * (1.0 - a.rate()) / a.trials as f64;
            let sd = (var(&c) + keep * keep * var(&l)).sqrt();
            let est = c.rate() - keep * l.rate();
            if est + z * sd < 0.0 {
                Verdict::Reject
            } else if est - z * sd > 0.0 {
                Verdict::Promote
            } else {
                Verdict::Undecided
            }
        };
        let runs = runs(&peeked, (P, P), HORIZON, 1);
        let false_rollbacks = share(&runs, Verdict::Reject, u64::MAX);
        println!("peeked fixed-sample test: false rollbacks {false_rollbacks}");
        assert!(
            false_rollbacks > s.alpha,
            "peeking a fixed-sample test: false rollbacks {false_rollbacks}"
        );
    }

    #[test]
    fn the_interval_narrows_with_trials_and_the_minimums_hold_back_a_verdict() {
        let s = TestSettings::default();
        let a = |t: u64, h: u64| Arm { trials: t, hits: h };
        let wide = s.interval(a(1_000, 100), a(9_000, 900));
        let narrow = s.interval(a(100_000, 10_000), a(900_000, 90_000));
        assert!(narrow.upper - narrow.lower < (wide.upper - wide.lower) / 5.0);
        assert!(wide.lower < 0.0 && wide.upper > 0.0);
        // a canary that never hits: rolled back, but only once both arms counted enough
        assert_eq!(s.verdict(a(150, 0), a(5_000, 500)), Verdict::Undecided);
        assert_eq!(s.verdict(a(400, 0), a(5_000, 500)), Verdict::Reject);
        assert!((normal_quantile(0.975) - 1.959964).abs() < 1e-5);
        assert!((normal_quantile(0.1) + 1.281552).abs() < 1e-5);
    }
}
