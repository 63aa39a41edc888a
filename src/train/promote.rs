//! The trainer as the canary's decider (live-gated promotion): a validated version is announced
//! as a canary (role `train`: to the fleet; role `all`: into its own live slot's canary), no
//! round starts while it runs, and the sequential test on the live evidence promotes it or rolls
//! it back (so is a canary still undecided after `promotion.max_duration`). After a rollback,
//! training continues from the live version, never from the rejected one.

use std::time::Duration;

use anyhow::{Context, Result};
use tracing::{error, info, warn};

use crate::promotion::{Decided, Evidence, TestSettings, Verdict};

use super::Worker;

/// Role `all`: the canary this worker runs in its own live slot, and what keeping it needs.
pub(super) struct LocalCanary {
    pub version: u64,
    pub started_unix_ms: u64,
    pub figures: serde_json::Value,
    pub items: Option<crate::model::ItemTable>,
    pub read: u64,
    pub validated: bool,
    /// The best model accepted so far, should it be promoted.
    pub best_version: Option<u64>,
}

/// The running canary: its version, when it started and its evidence.
struct Running {
    version: u64,
    started_unix_ms: u64,
    evidence: Evidence,
}

impl Worker {
    /// The share of users a newly accepted version scores as a canary: `None` (it goes live at
    /// once) with promotion off or with no live version to compare it with.
    pub(super) fn canary_fraction(&self) -> Option<f64> {
        let p = &self.ctx.promotion;
        let live = match &self.ctx.fleet {
            Some(_) => self.base.is_some(),
            None => self.ctx.live.current().is_some(),
        };
        (p.enabled && live).then_some(p.canary_fraction)
    }

    /// Whether a canary runs (no round starts meanwhile); decides it when the evidence allows,
    /// or when it ran past `promotion.max_duration`.
    pub(super) fn canary_pending(&mut self) -> bool {
        let Some(c) = self.running() else {
            self.ctx.metrics.canary_version.set(0);
            return false;
        };
        self.report(&c);
        let test = TestSettings::of(&self.ctx.promotion);
        let interval = test.interval(c.evidence.canary, c.evidence.live);
        let age = Duration::from_millis(crate::wire::now_ms().saturating_sub(c.started_unix_ms));
        let (decision, by) = match test.verdict(c.evidence.canary, c.evidence.live) {
            Verdict::Promote => (Decided::Promote, "test"),
            Verdict::Reject => (Decided::Reject, "test"),
            Verdict::Undecided if age >= self.ctx.promotion.max_duration => {
                (Decided::Reject, "timeout")
            }
            Verdict::Undecided => return true,
        };
        let reason = format!(
            "canary hit rate {:.4} over {} clicks, live {:.4} over {}; contrast {:.5} in [{:.5}, {:.5}] (margin {}, alpha {}) after {}",
            c.evidence.canary.rate(),
            c.evidence.canary.trials,
            c.evidence.live.rate(),
            c.evidence.live.trials,
            interval.estimate,
            interval.lower,
            interval.upper,
            test.margin,
            test.alpha,
            humantime::format_duration(Duration::from_secs(age.as_secs())),
        );
        if let Err(e) = self.decide_canary(c.version, decision, by, &reason, c.evidence) {
            error!(error = %format!("{e:#}"), model_version = c.version, "cannot announce the canary's decision; trying again in 5 s");
            self.ctx.shutdown.wait_timeout(Duration::from_secs(5));
        }
        true
    }

    /// The canary running now: the fleet's, or this worker's own (role `all`).
    fn running(&self) -> Option<Running> {
        if !self.ctx.promotion.enabled && self.local_canary.is_none() {
            return None;
        }
        match (&self.ctx.fleet, &self.local_canary) {
            (Some(f), _) => f.canary().map(|c| Running {
                version: c.version,
                started_unix_ms: c.announced_unix_ms,
                evidence: c.evidence,
            }),
            (None, Some(c)) => Some(Running {
                version: c.version,
                started_unix_ms: c.started_unix_ms,
                evidence: self.ctx.tally.get(c.version),
            }),
            (None, None) => None,
        }
    }

    /// The canary's state and evidence, as metrics.
    fn report(&self, c: &Running) {
        let m = &self.ctx.metrics;
        m.canary_version.set(c.version as i64);
        c.evidence.show_in(m);
        let i = TestSettings::of(&self.ctx.promotion).interval(c.evidence.canary, c.evidence.live);
        for (bound, v) in [
            ("estimate", i.estimate),
            ("lower", i.lower),
            ("upper", i.upper),
        ] {
            m.canary_bound.with_label_values(&[bound]).set(v);
        }
    }

    /// Announces a decision and makes it this worker's state: a promoted canary is what it
    /// trains on; after a rollback it continues from the live version.
    fn decide_canary(
        &mut self,
        version: u64,
        decision: Decided,
        by: &str,
        reason: &str,
        evidence: Evidence,
    ) -> Result<()> {
        match &self.ctx.fleet {
            Some(fleet) => {
                if !fleet.decide(version, decision, by, reason, evidence)? {
                    warn!(model_version = version, "the canary's decision was not taken (another decision, a rollback or a new trainer came first)");
                    return Ok(());
                }
                // a rejected canary: `may_train` adopts the live version the fleet serves
            }
            None => self.decide_locally(decision)?,
        }
        self.ctx
            .metrics
            .canary_decisions
            .with_label_values(&[decision.as_str(), by])
            .inc();
        match decision {
            Decided::Promote => {
                info!(
                    model_version = version,
                    by, reason, "canary promoted: it serves everyone"
                )
            }
            Decided::Reject => {
                warn!(model_version = version, by, reason, "canary rolled back: its slice is served by the live version again; training continues from the live version")
            }
        }
        Ok(())
    }

    /// Role `all`: a promoted canary is checkpointed and goes live; a rejected one is
    /// checkpointed and moved aside (its number is never used again), and training goes back
    /// to the live version's checkpoint.
    fn decide_locally(&mut self, decision: Decided) -> Result<()> {
        let mut c = self.local_canary.take().context("no local canary")?;
        // the manifest says what became of it
        c.figures["canary"] = decision.as_str().into();
        self.checkpoint(c.version, c.figures, c.items.as_ref())?;
        match decision {
            Decided::Promote => {
                let trainer = self.trainer.as_ref().context("no trainer")?;
                self.publish(trainer, c.version, c.read, c.validated)?;
                self.ctx.live.clear_canary();
                self.best_version = c.best_version;
                self.prune_checkpoints();
            }
            Decided::Reject => {
                self.ctx.live.clear_canary();
                self.checkpoints.set_aside_from(c.version)?;
                self.reload_latest(false)?;
            }
        }
        Ok(())
    }

    /// Role `all`: starts a canary of the accepted model in the live slot.
    pub(super) fn start_local_canary(&mut self, c: LocalCanary, fraction: f64) -> Result<()> {
        let trainer = self.trainer.as_ref().context("no trainer")?;
        let model = trainer.model().for_serving()?;
        self.ctx
            .live
            .publish_canary(crate::live::LiveModel::local(c.version, model), fraction);
        self.ctx.metrics.canary_version.set(c.version as i64);
        info!(
            model_version = c.version,
            fraction, "model accepted: serving a canary slice until the live evidence decides"
        );
        self.local_canary = Some(c);
        Ok(())
    }
}
