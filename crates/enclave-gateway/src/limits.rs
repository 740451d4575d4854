//! Rate limits per key and per tenant: requests per minute, tokens per minute (prompt and
//! completion tokens, charged as they are produced) and concurrent requests. Once a request's
//! size is known it claims a concurrency slot per generation (prompts × `n`) and reserves the
//! most tokens it can use (prompt + `max_tokens` × `n`), so a burst admitted on a nearly empty
//! bucket cannot overdraw it; what it does not use is refunded when it ends. Each per-minute
//! limit is a token bucket holding at most a minute's allowance and refilled continuously, so
//! exactly `limit` requests pass at once from rest and then one per `60 / limit` seconds.
//! Counters live in this process: with several replicas each enforces the limits on its own
//! traffic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A key's or a tenant's limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub concurrent_requests: Option<u64>,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        *self == Self::default()
    }
}

/// Whose allowance a request draws on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    Key(String),
    Tenant(String),
}

#[derive(Debug)]
struct Bucket {
    /// Units available now; may go below zero when tokens are charged after admission.
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn full(limit: u64, now: Instant) -> Self {
        Self {
            level: limit as f64,
            updated: now,
        }
    }

    fn refill(&mut self, limit: u64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * limit as f64 / 60.0).min(limit as f64);
        self.updated = now;
    }

    /// Time until the level reaches `needed`.
    fn wait_for(&self, needed: f64, limit: u64) -> Duration {
        let missing = needed - self.level;
        if missing <= 0.0 || limit == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(missing * 60.0 / limit as f64)
    }
}

#[derive(Debug)]
struct Allowance {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    in_flight: u64,
}

/// What one limit looks like after a decision, for `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    pub limit: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// The tightest request and token quotas of a request's subjects.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Quotas {
    pub requests: Option<Quota>,
    pub tokens: Option<Quota>,
}

/// Why a request was refused, and when to retry.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub subject: Subject,
    /// `requests per minute`, `tokens per minute` or `concurrent requests`.
    pub limit: &'static str,
    pub retry_after: Duration,
    pub quotas: Quotas,
    /// The request alone is over the limit: no wait lets it pass (its `n` or prompts, for a
    /// concurrency limit).
    pub never_fits: bool,
}

/// Every subject's allowance in this process.
#[derive(Debug, Default)]
pub struct RateLimiter {
    allowances: Mutex<HashMap<Subject, Allowance>>,
}

/// An admitted request: holds its concurrency slots until dropped, and charges tokens.
#[derive(Debug)]
pub struct Admission {
    limiter: Arc<RateLimiter>,
    subjects: Vec<(Subject, Limits)>,
    pub quotas: Quotas,
    /// Generations claimed ([`Self::claim`]); the request holds `max(1, sequences)` slots.
    sequences: u64,
    /// Tokens reserved and not yet charged, per subject (in `subjects`' order).
    reserved: Vec<u64>,
}

impl RateLimiter {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn allowances(&self) -> std::sync::MutexGuard<'_, HashMap<Subject, Allowance>> {
        self.allowances.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a request drawing on every `(subject, limits)` pair, or refuses it (taking
    /// nothing) naming the first limit it is over.
    pub fn admit(
        self: &Arc<Self>,
        subjects: Vec<(Subject, Limits)>,
    ) -> Result<Admission, Box<Refusal>> {
        let now = Instant::now();
        let mut all = self.allowances();
        for (subject, limits) in &subjects {
            let over = over_limit(allowance(&mut all, subject, limits, now), limits);
            if let Some((limit, retry_after)) = over {
                return Err(Box::new(Refusal {
                    subject: subject.clone(),
                    limit,
                    retry_after,
                    quotas: quotas(&mut all, &subjects, now),
                    never_fits: false,
                }));
            }
        }
        for (subject, limits) in &subjects {
            let allowance = allowance(&mut all, subject, limits, now);
            if let Some(bucket) = allowance.requests.as_mut() {
                bucket.level -= 1.0;
            }
            allowance.in_flight += 1;
        }
        let quotas = quotas(&mut all, &subjects, now);
        let reserved = vec![0; subjects.len()];
        Ok(Admission {
            limiter: self.clone(),
            subjects,
            quotas,
            sequences: 0,
            reserved,
        })
    }
}

impl Admission {
    /// Claims `sequences` more generations and reserves `tokens` more (each subject reserves
    /// at most its whole per-minute allowance, so any request can pass from a full bucket), or
    /// refuses, taking nothing, naming the first limit it is over.
    pub fn claim(&mut self, sequences: u64, tokens: u64) -> Result<(), Box<Refusal>> {
        let now = Instant::now();
        // The slot taken at admission is the first generation's.
        let extra = if self.sequences == 0 {
            sequences.saturating_sub(1)
        } else {
            sequences
        };
        let total = self.sequences.saturating_add(sequences).max(1);
        let mut all = self.limiter.allowances();
        for (subject, limits) in &self.subjects {
            let allowance = allowance(&mut all, subject, limits, now);
            let over = if limits.concurrent_requests.is_some_and(|most| total > most) {
                Some(("concurrent requests", Duration::ZERO, true))
            } else if limits
                .concurrent_requests
                .is_some_and(|most| allowance.in_flight.saturating_add(extra) > most)
            {
                Some(("concurrent requests", Duration::from_secs(1), false))
            } else {
                match (&allowance.tokens, limits.tokens_per_minute) {
                    (Some(bucket), Some(limit)) if bucket.level < tokens.min(limit) as f64 => {
                        let wait = bucket.wait_for(tokens.min(limit) as f64, limit);
                        Some(("tokens per minute", wait, false))
                    }
                    _ => None,
                }
            };
            if let Some((limit, retry_after, never_fits)) = over {
                return Err(Box::new(Refusal {
                    subject: subject.clone(),
                    limit,
                    retry_after,
                    quotas: quotas(&mut all, &self.subjects, now),
                    never_fits,
                }));
            }
        }
        for ((subject, limits), reserved) in self.subjects.iter().zip(self.reserved.iter_mut()) {
            let allowance = allowance(&mut all, subject, limits, now);
            allowance.in_flight = allowance.in_flight.saturating_add(extra);
            if let (Some(bucket), Some(limit)) =
                (allowance.tokens.as_mut(), limits.tokens_per_minute)
            {
                let reserve = tokens.min(limit);
                bucket.level -= reserve as f64;
                *reserved = reserved.saturating_add(reserve);
            }
        }
        self.sequences = self.sequences.saturating_add(sequences);
        Ok(())
    }

    /// Generations claimed so far.
    pub fn sequences(&self) -> u64 {
        self.sequences
    }

    /// Charges `tokens` (prompt or completion) to every subject's tokens-per-minute bucket,
    /// from its reservation first.
    pub fn charge_tokens(&mut self, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let now = Instant::now();
        let mut all = self.limiter.allowances();
        for ((subject, limits), reserved) in self.subjects.iter().zip(self.reserved.iter_mut()) {
            let from_reserve = tokens.min(*reserved);
            *reserved -= from_reserve;
            if let Some(bucket) = allowance(&mut all, subject, limits, now).tokens.as_mut() {
                bucket.level -= (tokens - from_reserve) as f64;
            }
        }
    }
}

impl Drop for Admission {
    /// Gives back the request's slots and refunds the tokens it reserved and did not use.
    fn drop(&mut self) {
        let slots = self.sequences.max(1);
        let now = Instant::now();
        let mut all = self.limiter.allowances();
        for ((subject, limits), reserved) in self.subjects.iter().zip(&self.reserved) {
            let Some(allowance) = all.get_mut(subject) else {
                continue;
            };
            allowance.in_flight = allowance.in_flight.saturating_sub(slots);
            if *reserved > 0 {
                if let (Some(bucket), Some(limit)) =
                    (allowance.tokens.as_mut(), limits.tokens_per_minute)
                {
                    bucket.refill(limit, now);
                    bucket.level = (bucket.level + *reserved as f64).min(limit as f64);
                }
            }
        }
    }
}

/// The first limit `allowance` is over, and how long until it is not.
fn over_limit(allowance: &Allowance, limits: &Limits) -> Option<(&'static str, Duration)> {
    if let (Some(bucket), Some(limit)) = (&allowance.requests, limits.requests_per_minute) {
        if bucket.level < 1.0 {
            return Some(("requests per minute", bucket.wait_for(1.0, limit)));
        }
    }
    // Admitted while any token is left; what the request then uses is charged as it goes.
    if let (Some(bucket), Some(limit)) = (&allowance.tokens, limits.tokens_per_minute) {
        if bucket.level < 1.0 {
            return Some(("tokens per minute", bucket.wait_for(1.0, limit)));
        }
    }
    if limits
        .concurrent_requests
        .is_some_and(|most| allowance.in_flight >= most)
    {
        // A slot frees when a request ends; a second is a fair guess.
        return Some(("concurrent requests", Duration::from_secs(1)));
    }
    None
}

/// `subject`'s allowance, refilled to `now` and following `limits` (which may have changed
/// since it was made: a new limit starts full).
fn allowance<'a>(
    all: &'a mut HashMap<Subject, Allowance>,
    subject: &Subject,
    limits: &Limits,
    now: Instant,
) -> &'a mut Allowance {
    let allowance = all.entry(subject.clone()).or_insert_with(|| Allowance {
        requests: None,
        tokens: None,
        in_flight: 0,
    });
    for (bucket, limit) in [
        (&mut allowance.requests, limits.requests_per_minute),
        (&mut allowance.tokens, limits.tokens_per_minute),
    ] {
        match (bucket.as_mut(), limit) {
            (_, None) => *bucket = None,
            (None, Some(limit)) => *bucket = Some(Bucket::full(limit, now)),
            (Some(b), Some(limit)) => b.refill(limit, now),
        }
    }
    allowance
}

fn quotas(
    all: &mut HashMap<Subject, Allowance>,
    subjects: &[(Subject, Limits)],
    now: Instant,
) -> Quotas {
    let mut quotas = Quotas::default();
    for (subject, limits) in subjects {
        let allowance = allowance(all, subject, limits, now);
        for (slot, bucket, limit) in [
            (
                &mut quotas.requests,
                &allowance.requests,
                limits.requests_per_minute,
            ),
            (
                &mut quotas.tokens,
                &allowance.tokens,
                limits.tokens_per_minute,
            ),
        ] {
            let (Some(bucket), Some(limit)) = (bucket, limit) else {
                continue;
            };
            let quota = Quota {
                limit,
                remaining: bucket.level.max(0.0).floor() as u64,
                reset: bucket.wait_for(limit as f64, limit),
            };
            if slot.is_none_or(|q| quota.remaining < q.remaining) {
                *slot = Some(quota);
            }
        }
    }
    quotas
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(rpm: Option<u64>, tpm: Option<u64>, concurrent: Option<u64>) -> (Subject, Limits) {
        (
            Subject::Key("k".into()),
            Limits {
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
                concurrent_requests: concurrent,
            },
        )
    }

    #[test]
    fn exactly_the_limit_passes_from_rest() {
        let limiter = RateLimiter::new();
        let mut admitted = Vec::new();
        for i in 0..5 {
            let admission = limiter.admit(vec![key(Some(5), None, None)]);
            let admission = admission.unwrap_or_else(|r| panic!("request {i}: {r:?}"));
            assert_eq!(admission.quotas.requests.map(|q| q.remaining), Some(4 - i));
            admitted.push(admission);
        }
        let refused = limiter.admit(vec![key(Some(5), None, None)]);
        let Err(refusal) = refused else {
            panic!("the sixth request passed")
        };
        assert_eq!(refusal.limit, "requests per minute");
        // One request comes back every 12 s.
        assert!(refusal.retry_after > Duration::from_secs(11));
        assert!(refusal.retry_after <= Duration::from_secs(12));
    }

    #[test]
    fn tokens_are_charged_after_admission_and_block_when_spent() {
        let limiter = RateLimiter::new();
        let mut first = limiter.admit(vec![key(None, Some(100), None)]).unwrap();
        first.charge_tokens(60);
        let mut second = limiter.admit(vec![key(None, Some(100), None)]).unwrap();
        assert_eq!(second.quotas.tokens.map(|q| q.remaining), Some(40));
        second.charge_tokens(70);
        let refusal = limiter.admit(vec![key(None, Some(100), None)]).unwrap_err();
        assert_eq!(refusal.limit, "tokens per minute");
        assert_eq!(refusal.quotas.tokens.map(|q| q.remaining), Some(0));
        // 31 tokens missing at 100 a minute.
        assert!(refusal.retry_after > Duration::from_millis(18_000));
        assert!(refusal.retry_after <= Duration::from_millis(18_600));
    }

    #[test]
    fn concurrency_slots_return_when_requests_end() {
        let limiter = RateLimiter::new();
        let a = limiter.admit(vec![key(None, None, Some(2))]).unwrap();
        let _b = limiter.admit(vec![key(None, None, Some(2))]).unwrap();
        assert_eq!(
            limiter
                .admit(vec![key(None, None, Some(2))])
                .unwrap_err()
                .limit,
            "concurrent requests"
        );
        drop(a);
        assert!(limiter.admit(vec![key(None, None, Some(2))]).is_ok());
    }

    #[test]
    fn a_refusal_by_one_subject_takes_nothing_from_the_others() {
        let limiter = RateLimiter::new();
        let tenant = |rpm| {
            (
                Subject::Tenant("acme".into()),
                Limits {
                    requests_per_minute: Some(rpm),
                    ..Limits::default()
                },
            )
        };
        let _one = limiter
            .admit(vec![key(Some(10), None, None), tenant(1)])
            .unwrap();
        let refusal = limiter
            .admit(vec![key(Some(10), None, None), tenant(1)])
            .unwrap_err();
        assert_eq!(refusal.subject, Subject::Tenant("acme".into()));
        // The key's bucket lost only the one admitted request.
        let admission = limiter.admit(vec![key(Some(10), None, None)]).unwrap();
        assert_eq!(admission.quotas.requests.map(|q| q.remaining), Some(8));
    }

    #[test]
    fn every_generation_of_a_request_takes_a_concurrency_slot() {
        let limiter = RateLimiter::new();
        let mut one = limiter.admit(vec![key(None, None, Some(8))]).unwrap();
        // Two prompts × n = 3: six slots, the admission's first among them.
        one.claim(6, 0).unwrap();
        let mut two = limiter.admit(vec![key(None, None, Some(8))]).unwrap();
        let refusal = two.claim(3, 0).unwrap_err();
        assert_eq!(refusal.limit, "concurrent requests");
        assert!(!refusal.never_fits, "a retry passes once the first ends");
        two.claim(2, 0).unwrap();
        assert!(limiter.admit(vec![key(None, None, Some(8))]).is_err());
        drop(one);
        drop(two);
        // All eight slots back: a request of nine generations can never pass.
        let mut three = limiter.admit(vec![key(None, None, Some(8))]).unwrap();
        let refusal = three.claim(9, 0).unwrap_err();
        assert!(refusal.never_fits);
        three.claim(8, 0).unwrap();
    }

    #[test]
    fn the_most_a_request_can_use_is_reserved_and_the_rest_refunded() {
        let limiter = RateLimiter::new();
        let mut big = limiter.admit(vec![key(None, Some(1000), None)]).unwrap();
        // A prompt of 100 tokens, n = 4 choices of at most 200.
        big.claim(4, 100 + 4 * 200).unwrap();
        // Only 100 tokens are left: a second request of at most 150 waits for them.
        let mut small = limiter.admit(vec![key(None, Some(1000), None)]).unwrap();
        let refusal = small.claim(1, 150).unwrap_err();
        assert_eq!(refusal.limit, "tokens per minute");
        assert!(refusal.retry_after > Duration::from_secs(2));
        small.claim(1, 90).unwrap();
        // The big one used 100 prompt and 300 completion tokens: 500 come back when it ends.
        big.charge_tokens(100);
        big.charge_tokens(300);
        drop(big);
        let mut third = limiter.admit(vec![key(None, Some(1000), None)]).unwrap();
        third.claim(1, 500).unwrap();
        // Charges beyond a reservation come from the bucket.
        small.charge_tokens(90 + 10);
        drop(small);
        // Third used nothing: its 500 return whole; small's extra 10 stay spent.
        drop(third);
        let fourth = limiter.admit(vec![key(None, Some(1000), None)]).unwrap();
        let left = fourth.quotas.tokens.map(|q| q.remaining).unwrap();
        assert!((500..=502).contains(&left), "{left} tokens left");
    }

    #[test]
    fn a_reservation_never_exceeds_a_whole_allowance() {
        let limiter = RateLimiter::new();
        let mut huge = limiter.admit(vec![key(None, Some(1000), None)]).unwrap();
        // max_tokens far past the per-minute limit: it needs a full bucket, and takes it.
        huge.claim(1, 1_000_000).unwrap();
        let mut next = limiter.admit(vec![key(None, Some(1000), None)]);
        assert!(next.is_err() || next.as_mut().unwrap().claim(1, 1).is_err());
    }
}
