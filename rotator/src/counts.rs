//! [`RotationCounts`]: the rotations this rotator ran, by strategy and result, counted where
//! each one's history is written (for `/metrics`; the history keeps only the last one of
//! each service).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::labels::Strategy;

/// How a rotation ended, as its history records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationResult {
    /// Every running container of the service was rotated (`done`).
    Done,
    /// A rule refused it before anything changed (`refused`).
    Refused,
    /// It failed (`failed`); the strategy's own rollback kept the old container serving.
    Failed,
}

impl RotationResult {
    /// Every result, in index order.
    pub const ALL: [RotationResult; 3] = [
        RotationResult::Done,
        RotationResult::Refused,
        RotationResult::Failed,
    ];

    /// The label, as in the history: `done`, `refused` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            RotationResult::Done => "done",
            RotationResult::Refused => "refused",
            RotationResult::Failed => "failed",
        }
    }
}

/// Every strategy a history can record, in index order (`auto` when a rotation failed
/// before its strategy was resolved).
pub const STRATEGIES: [Strategy; 5] = [
    Strategy::Rolling,
    Strategy::Restart,
    Strategy::Signal,
    Strategy::None,
    Strategy::Auto,
];

/// Rotations run since the rotator started, per strategy and result.
#[derive(Debug, Default)]
pub struct RotationCounts {
    n: [[AtomicU64; RotationResult::ALL.len()]; STRATEGIES.len()],
}

impl RotationCounts {
    /// Counts one rotation.
    pub(crate) fn add(&self, strategy: Strategy, result: RotationResult) {
        self.n[strategy_index(strategy)][result as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Rotations that used `strategy` and ended with `result`.
    pub fn get(&self, strategy: Strategy, result: RotationResult) -> u64 {
        self.n[strategy_index(strategy)][result as usize].load(Ordering::Relaxed)
    }
}

fn strategy_index(s: Strategy) -> usize {
    match s {
        Strategy::Rolling => 0,
        Strategy::Restart => 1,
        Strategy::Signal => 2,
        Strategy::None => 3,
        Strategy::Auto => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_pair_apart() {
        let c = RotationCounts::default();
        c.add(Strategy::Rolling, RotationResult::Done);
        c.add(Strategy::Rolling, RotationResult::Done);
        c.add(Strategy::Auto, RotationResult::Failed);
        assert_eq!(c.get(Strategy::Rolling, RotationResult::Done), 2);
        assert_eq!(c.get(Strategy::Auto, RotationResult::Failed), 1);
        assert_eq!(c.get(Strategy::Rolling, RotationResult::Failed), 0);
        for (i, s) in STRATEGIES.iter().enumerate() {
            assert_eq!(strategy_index(*s), i);
        }
    }
}
