//! Repeated authentication failures — from one address, or against one key id — block that
//! address or key for a while (the "frequent login failures" rule of MLPS level 3): a
//! credential-guessing client is stopped after a few tries instead of being answered at full
//! speed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbuseLimits {
    /// Failures within `window` that trigger a block; 0 turns the rule off.
    pub max_failures: u32,
    pub window: Duration,
    /// How long a block lasts.
    pub block: Duration,
}

impl Default for AbuseLimits {
    fn default() -> Self {
        Self {
            max_failures: 10,
            window: Duration::from_secs(60),
            block: Duration::from_secs(300),
        }
    }
}

/// What is being watched: a client address or a key id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Offender {
    Source(String),
    Key(String),
}

impl Offender {
    pub fn describe(&self) -> String {
        match self {
            Offender::Source(address) => format!("address {address}"),
            Offender::Key(id) => format!("key {id}"),
        }
    }
}

#[derive(Debug, Default)]
struct Record {
    /// Failure times within the window, oldest first.
    failures: Vec<Instant>,
    blocked_until: Option<Instant>,
}

/// A block that just started (for the audit log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStarted {
    pub offender: Offender,
    pub failures: u32,
    pub duration: Duration,
}

/// Entries beyond which idle ones are swept, so random addresses cannot grow the table without
/// bound.
const CAPACITY: usize = 65_536;

/// Failure counts and blocks, in memory (per process, like the rate limits).
#[derive(Debug, Default)]
pub struct AbuseGuard {
    limits: AbuseLimits,
    records: Mutex<HashMap<Offender, Record>>,
}

impl AbuseGuard {
    pub fn new(limits: AbuseLimits) -> Self {
        Self {
            limits,
            records: Mutex::new(HashMap::new()),
        }
    }

    /// How much longer any of `offenders` is blocked, if at all.
    pub fn blocked(&self, offenders: &[Offender], now: Instant) -> Option<Duration> {
        if self.limits.max_failures == 0 {
            return None;
        }
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        offenders
            .iter()
            .filter_map(|o| records.get(o)?.blocked_until)
            .filter(|until| *until > now)
            .map(|until| until - now)
            .max()
    }

    /// Counts a failed authentication of each of `offenders`; returns the blocks it starts.
    pub fn failed(&self, offenders: &[Offender], now: Instant) -> Vec<BlockStarted> {
        let limits = self.limits;
        if limits.max_failures == 0 {
            return Vec::new();
        }
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if records.len() >= CAPACITY {
            records.retain(|_, r| {
                r.blocked_until.is_some_and(|u| u > now)
                    || r.failures.last().is_some_and(|t| now - *t < limits.window)
            });
            // Still full (a flood of addresses): keep the blocks, forget the counts, and if
            // even the blocks fill it, start over rather than grow.
            if records.len() >= CAPACITY / 2 {
                records.retain(|_, r| r.blocked_until.is_some_and(|u| u > now));
            }
            if records.len() >= CAPACITY / 2 {
                records.clear();
            }
        }
        let mut started = Vec::new();
        for offender in offenders {
            let record = records.entry(offender.clone()).or_default();
            if record.blocked_until.is_some_and(|u| u > now) {
                continue;
            }
            record.failures.retain(|t| now - *t < limits.window);
            record.failures.push(now);
            if record.failures.len() >= limits.max_failures as usize {
                record.blocked_until = Some(now + limits.block);
                started.push(BlockStarted {
                    offender: offender.clone(),
                    failures: record.failures.len() as u32,
                    duration: limits.block,
                });
                record.failures.clear();
            }
        }
        started
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn n_failures_in_the_window_block_until_the_block_ends() {
        let guard = AbuseGuard::new(AbuseLimits {
            max_failures: 3,
            window: Duration::from_secs(10),
            block: Duration::from_secs(30),
        });
        let t0 = Instant::now();
        let ip = [Offender::Source("10.0.0.9".into())];
        assert!(guard.failed(&ip, t0).is_empty());
        assert!(guard.failed(&ip, t0 + Duration::from_secs(1)).is_empty());
        assert_eq!(guard.blocked(&ip, t0 + Duration::from_secs(1)), None);
        let started = guard.failed(&ip, t0 + Duration::from_secs(2));
        assert_eq!(started.len(), 1);
        assert_eq!(started[0].failures, 3);
        assert_eq!(
            guard.blocked(&ip, t0 + Duration::from_secs(2)),
            Some(Duration::from_secs(30))
        );
        // Another address is not affected.
        assert_eq!(
            guard.blocked(&[Offender::Source("10.0.0.10".into())], t0),
            None
        );
        assert_eq!(guard.blocked(&ip, t0 + Duration::from_secs(33)), None);
        // Failures spread wider than the window never add up.
        let slow = [Offender::Key("0123456789abcdef".into())];
        for i in 0..10 {
            assert!(guard
                .failed(&slow, t0 + Duration::from_secs(6 * i))
                .is_empty());
        }
    }

    #[test]
    fn zero_turns_the_rule_off() {
        let guard = AbuseGuard::new(AbuseLimits {
            max_failures: 0,
            ..AbuseLimits::default()
        });
        let ip = [Offender::Source("10.0.0.9".into())];
        let now = Instant::now();
        for _ in 0..100 {
            assert!(guard.failed(&ip, now).is_empty());
        }
        assert_eq!(guard.blocked(&ip, now), None);
    }
}
