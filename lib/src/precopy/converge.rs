//! Convergence: a pure function of the rounds so far and the budget.
//!
//! After each round the engine knows how many bytes it sent, how long that took, and how many bytes
//! the process dirtied meanwhile (the next round's work), and over how many connections at once. From
//! the recent rounds it estimates the bandwidth of one connection: the final round runs in a signal
//! handler, which may not start threads, so it has one connection however many the rounds had. The
//! downtime of stopping now is the remaining dirty bytes at that bandwidth plus a fixed cost
//! (threads, records, restore on the far side). The engine stops when
//!
//! 1. the estimated downtime is within the budget (the goal), or
//! 2. the rounds stopped shrinking the dirty set (the process dirties memory about as fast as it can
//!    be sent): with auto-converge the application's threads are throttled instead, more each round
//!    that does not halve the work (as QEMU does: start at 20 %, add 10 % per round, at most 99 %);
//!    without it, or at full throttle, it stops and takes the longer downtime, or
//! 3. a round or time limit is reached.
//!
//! Every case is a [`StopReason`] the caller can print. The function keeps no state: the caller
//! hands it the whole history, so it is trivially testable and replayable.

use std::time::Duration;

/// What one round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundStats {
    /// Bytes sent in the round.
    pub sent: u64,
    /// How long the round took.
    pub elapsed: Duration,
    /// Bytes the process dirtied during the round (what the next round must send).
    pub dirtied: u64,
    /// Connections (or placing writers) the round's pages went over at once (0 counts as 1).
    pub lanes: u32,
}

/// The limits of a migration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// The longest acceptable freeze.
    pub downtime: Duration,
    /// Fixed freeze cost beyond the pages (thread records, restore on the far side).
    pub fixed_cost: Duration,
    /// The most pre-copy rounds.
    pub max_rounds: u32,
    /// The longest the pre-copy phase may take.
    pub max_time: Duration,
    /// Throttle the application instead of giving up when it dirties too fast.
    pub auto_converge: bool,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            downtime: Duration::from_millis(50),
            // An idle process's freeze on the benchmark's nodes: 11-20 ms (docs/migration.md).
            fixed_cost: Duration::from_millis(15),
            max_rounds: 30,
            max_time: Duration::from_secs(300),
            auto_converge: false,
        }
    }
}

/// Why the pre-copy phase ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StopReason {
    /// The estimated downtime is within the budget.
    WithinBudget {
        /// The estimate.
        estimated: Duration,
    },
    /// The rounds no longer shrink the dirty set (and throttling is off or at its limit).
    NoProgress {
        /// The downtime to expect.
        estimated: Duration,
    },
    /// The round limit.
    RoundLimit,
    /// The time limit.
    TimeLimit,
}

/// What to do after a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Another round; `throttle` is the share of time the application's threads should sleep (0 for
    /// none).
    Continue {
        /// 0.0 ..= 0.99.
        throttle: f64,
    },
    /// Freeze and send the rest.
    Stop(StopReason),
}

/// The first throttle, its step per round, and its ceiling (QEMU's defaults).
const THROTTLE_START: f64 = 0.2;
const THROTTLE_STEP: f64 = 0.1;
const THROTTLE_MAX: f64 = 0.99;
/// Rounds compared to tell progress: the dirty set must shrink by a tenth over this many.
const PROGRESS_WINDOW: usize = 3;

/// Bytes per second of one connection over the last few rounds (the recent link, not the slow start),
/// or over the last round alone where that was slower: what the final round, which has one
/// connection and sends the pages written last, can expect.
///
/// A round over two streams of a busy two-core pair of nodes went at 1.6-1.8 GB/s; the final round
/// after it at 0.8-0.9 (docs/migration.md). Later rounds send scattered pages, which cost more per
/// byte than round 0's long runs: a few rounds' sum, mostly round 0's bytes, made the final round
/// look faster than the last round had been.
fn bandwidth(rounds: &[RoundStats]) -> f64 {
    let per_lane = |rs: &[RoundStats]| {
        let bytes: f64 = rs.iter().map(|r| r.sent as f64 / f64::from(r.lanes.max(1))).sum();
        let secs: f64 = rs.iter().map(|r| r.elapsed.as_secs_f64()).sum();
        if secs > 0.0 { bytes / secs } else { f64::INFINITY }
    };
    let recent = per_lane(&rounds[rounds.len().saturating_sub(PROGRESS_WINDOW)..]);
    let last = per_lane(&rounds[rounds.len().saturating_sub(1)..]);
    recent.min(last)
}

/// The freeze if the engine stopped after `rounds`.
#[must_use]
pub fn estimated_downtime(rounds: &[RoundStats], budget: &Budget) -> Duration {
    let Some(last) = rounds.last() else {
        return Duration::MAX;
    };
    let bw = bandwidth(rounds);
    let secs = if last.dirtied == 0 {
        0.0
    } else if bw.is_finite() && bw > 0.0 {
        last.dirtied as f64 / bw
    } else if bw.is_infinite() {
        0.0
    } else {
        return Duration::MAX;
    };
    Duration::try_from_secs_f64(secs).map_or(Duration::MAX, |d| d.saturating_add(budget.fixed_cost))
}

/// True when the last [`PROGRESS_WINDOW`] rounds did not shrink the dirty set by a tenth.
fn stalled(rounds: &[RoundStats]) -> bool {
    if rounds.len() <= PROGRESS_WINDOW {
        return false;
    }
    let then = rounds[rounds.len() - 1 - PROGRESS_WINDOW].dirtied;
    let now = rounds[rounds.len() - 1].dirtied;
    now as f64 > then as f64 * 0.9
}

/// Decides after `rounds` (the whole history, oldest first), `elapsed` into the pre-copy phase,
/// with the application currently throttled by `throttle`.
#[must_use]
pub fn decide(rounds: &[RoundStats], budget: &Budget, elapsed: Duration, throttle: f64) -> Decision {
    if rounds.is_empty() {
        return Decision::Continue { throttle: 0.0 };
    }
    let estimated = estimated_downtime(rounds, budget);
    if estimated <= budget.downtime {
        return Decision::Stop(StopReason::WithinBudget { estimated });
    }
    if u32::try_from(rounds.len()).unwrap_or(u32::MAX) >= budget.max_rounds {
        return Decision::Stop(StopReason::RoundLimit);
    }
    if elapsed >= budget.max_time {
        return Decision::Stop(StopReason::TimeLimit);
    }
    // With auto-converge, a round that did not halve the work throttles harder (QEMU's test:
    // dirtied more than half of what was sent).
    let last = rounds[rounds.len() - 1];
    let too_fast = rounds.len() > 1 && last.dirtied > last.sent / 2;
    if stalled(rounds) || (budget.auto_converge && too_fast) {
        if !budget.auto_converge || throttle >= THROTTLE_MAX {
            return Decision::Stop(StopReason::NoProgress { estimated });
        }
        let next = if throttle <= 0.0 {
            THROTTLE_START
        } else {
            (throttle + THROTTLE_STEP).min(THROTTLE_MAX)
        };
        return Decision::Continue { throttle: next };
    }
    Decision::Continue {
        throttle: throttle.clamp(0.0, THROTTLE_MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    fn round(sent: u64, ms: u64, dirtied: u64) -> RoundStats {
        RoundStats {
            sent,
            elapsed: Duration::from_millis(ms),
            dirtied,
            lanes: 1,
        }
    }

    /// A process of `size` bytes over a link of `bw` bytes/s, dirtying `rate` bytes/s (capped by its
    /// size), throttled as decided: the history the engine would see.
    // The simulated byte counts are non-negative and far below 2^53.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn simulate(size: u64, bw: f64, rate: f64, budget: &Budget) -> (Vec<RoundStats>, StopReason) {
        let mut rounds = Vec::new();
        let mut to_send = size;
        let mut throttle = 0.0;
        let mut elapsed = Duration::ZERO;
        loop {
            let secs = to_send as f64 / bw;
            let dirtied = ((rate * (1.0 - throttle) * secs) as u64).min(size);
            let r = RoundStats {
                sent: to_send,
                elapsed: Duration::from_secs_f64(secs),
                dirtied,
                lanes: 1,
            };
            elapsed += r.elapsed;
            rounds.push(r);
            match decide(&rounds, budget, elapsed, throttle) {
                Decision::Stop(why) => return (rounds, why),
                Decision::Continue { throttle: t } => throttle = t,
            }
            to_send = dirtied;
        }
    }

    #[test]
    fn an_idle_process_stops_after_round_zero() {
        let b = Budget::default();
        let (rounds, why) = simulate(1 << 30, 1e9, 0.0, &b);
        assert_eq!(rounds.len(), 1);
        assert!(matches!(why, StopReason::WithinBudget { .. }), "{why:?}");
    }

    #[test]
    fn a_moderate_writer_converges_within_the_budget() {
        // 1 GiB at 1 GB/s, dirtying 64 MiB/s: each round is about 1/16 of the one before.
        let b = Budget::default();
        let (rounds, why) = simulate(1 << 30, 1e9, 64.0 * MIB as f64, &b);
        match why {
            StopReason::WithinBudget { estimated } => assert!(estimated <= b.downtime),
            other => panic!("{other:?} after {rounds:?}"),
        }
        assert!(rounds.len() <= 4, "{rounds:?}");
    }

    #[test]
    fn a_writer_faster_than_the_link_stops_for_no_progress_or_is_throttled_down() {
        let mut b = Budget::default();
        let (_, why) = simulate(1 << 30, 1e8, 4e8, &b);
        assert!(matches!(why, StopReason::NoProgress { .. }), "{why:?}");
        // Throttled, the same writer converges.
        b.auto_converge = true;
        let (rounds, why) = simulate(1 << 30, 1e8, 4e8, &b);
        assert!(
            matches!(why, StopReason::WithinBudget { .. }),
            "{why:?} after {} rounds",
            rounds.len()
        );
    }

    #[test]
    fn the_final_round_is_estimated_at_one_connections_share() {
        // Session 16: round 0 of 1 GiB over two streams in 0.6 s, 46 MiB dirtied meanwhile. At the
        // round's own rate the rest would take 27 ms (42 with the fixed cost, within 50), but the
        // final round has one connection: it froze the process for 69 ms.
        let b = Budget::default();
        let mut r = round(1 << 30, 600, 46 * MIB);
        r.lanes = 2;
        let est = estimated_downtime(&[r], &b);
        assert!(
            est > Duration::from_millis(65) && est < Duration::from_millis(75),
            "{est:?}"
        );
        assert_eq!(
            decide(&[r], &b, Duration::ZERO, 0.0),
            Decision::Continue { throttle: 0.0 }
        );
        // The same round over one connection would have been estimated at its own rate.
        r.lanes = 1;
        assert!(matches!(
            decide(&[r], &b, Duration::ZERO, 0.0),
            Decision::Stop(StopReason::WithinBudget { .. })
        ));
        // 0 lanes (an old peer, a transport that does not say) counts as 1.
        r.lanes = 0;
        assert_eq!(estimated_downtime(&[r], &b), {
            r.lanes = 1;
            estimated_downtime(&[r], &b)
        });
    }

    #[test]
    fn the_last_round_of_scattered_pages_sets_the_rate_when_it_was_slower() {
        // Session 16, 64 MiB/s: round 0 of 1 GiB in 0.8 s and round 1 of 51 MB of scattered pages
        // in 60 ms, both over two streams; 7 MB dirtied during round 1. Over both rounds one
        // connection did 0.65 GB/s (11 ms for the rest), over round 1 alone 0.43 (16.5 ms); the
        // freezes measured were 27.5-42.9 ms.
        let b = Budget::default();
        let mut r0 = round(1 << 30, 800, 51 * MIB);
        let mut r1 = round(51 * MIB, 60, 7 * MIB);
        r0.lanes = 2;
        r1.lanes = 2;
        let est = estimated_downtime(&[r0, r1], &b);
        assert!(
            est > Duration::from_millis(30) && est < Duration::from_millis(33),
            "{est:?}"
        );
        // A last round faster than the window does not make the estimate more hopeful.
        let r1 = round(51 * MIB, 20, 7 * MIB);
        let window = (f64::from(1u32 << 30) / 2.0 + 51.0 * MIB as f64) / 0.82;
        let est = estimated_downtime(&[r0, r1], &b) - b.fixed_cost;
        assert!(
            (est.as_secs_f64() - 7.0 * MIB as f64 / window).abs() < 1e-4,
            "{est:?}"
        );
    }

    #[test]
    fn limits_end_it() {
        let b = Budget {
            max_rounds: 2,
            ..Budget::default()
        };
        let r = [round(100 * MIB, 100, 90 * MIB), round(90 * MIB, 90, 80 * MIB)];
        assert_eq!(
            decide(&r, &b, Duration::ZERO, 0.0),
            Decision::Stop(StopReason::RoundLimit)
        );
        let b = Budget {
            max_time: Duration::from_secs(1),
            ..Budget::default()
        };
        assert_eq!(
            decide(&r, &b, Duration::from_secs(2), 0.0),
            Decision::Stop(StopReason::TimeLimit)
        );
    }

    proptest! {
        /// Against the plain definitions: never past the round limit; a stop within budget is
        /// within budget; within budget always stops; the throttle only grows, and stays under 1.
        #[test]
        fn decisions_keep_their_promises(
            raw in proptest::collection::vec((0u64..1 << 32, 1u64..5_000, 0u64..1 << 32, 0u32..8), 1..40),
            budget_ms in 1u64..500,
            max_rounds in 1u32..40,
            auto in any::<bool>(),
            throttle in 0.0f64..0.99,
        ) {
            let rounds: Vec<RoundStats> = raw
                .iter()
                .map(|&(s, ms, d, lanes)| RoundStats { lanes, ..round(s, ms, d) })
                .collect();
            let b = Budget {
                downtime: Duration::from_millis(budget_ms),
                max_rounds,
                auto_converge: auto,
                ..Budget::default()
            };
            let est = estimated_downtime(&rounds, &b);
            let d = decide(&rounds, &b, Duration::ZERO, throttle);
            if est <= b.downtime {
                prop_assert_eq!(d, Decision::Stop(StopReason::WithinBudget { estimated: est }));
            }
            if rounds.len() >= max_rounds as usize {
                prop_assert!(matches!(d, Decision::Stop(_)));
            }
            if let Decision::Continue { throttle: t } = d {
                prop_assert!((0.0..=THROTTLE_MAX).contains(&t));
                prop_assert!(t >= throttle.min(THROTTLE_MAX) - 1e-12);
                if !auto {
                    prop_assert!((t - throttle).abs() < 1e-12);
                }
            }
            if let Decision::Stop(StopReason::WithinBudget { estimated }) = d {
                prop_assert!(estimated <= b.downtime);
            }
            // Never more hopeful than one connection's share of the recent rounds' bandwidth, nor of
            // the last round's.
            let last = rounds[rounds.len() - 1];
            let recent = &rounds[rounds.len().saturating_sub(PROGRESS_WINDOW)..];
            let per_lane: f64 = recent.iter().map(|r| r.sent as f64 / f64::from(r.lanes.max(1))).sum::<f64>()
                / recent.iter().map(|r| r.elapsed.as_secs_f64()).sum::<f64>();
            let last_rate = last.sent as f64 / f64::from(last.lanes.max(1)) / last.elapsed.as_secs_f64();
            for rate in [per_lane, last_rate] {
                if last.dirtied > 0 && rate > 0.0 {
                    let floor = last.dirtied as f64 / rate;
                    prop_assert!(est.as_secs_f64() >= floor * 0.999, "{est:?} below {floor} s");
                }
            }
        }
    }
}
