//! Usage per tenant, key and UTC day: counted in memory as requests arrive and tokens are
//! produced, and added to the database by [`UsageLedger::flush`] (the server calls it every few
//! seconds and at shutdown), so the database sees one upsert per key and day per flush instead
//! of a write per token. A crash loses at most the counts since the last flush.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::Result;
use crate::store::Store;

/// Counts of one tenant, key and day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageCounts {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl UsageCounts {
    fn add(&mut self, other: UsageCounts) {
        self.requests += other.requests;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
    }
}

/// One row of `enclave usage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub tenant: String,
    pub key_id: String,
    /// Unix time of the UTC day's start.
    pub day: i64,
    pub counts: UsageCounts,
}

type LedgerKey = (String, String, i64);

/// Counts not yet in the database.
#[derive(Debug, Default)]
pub struct UsageLedger {
    pending: Mutex<HashMap<LedgerKey, UsageCounts>>,
}

impl UsageLedger {
    pub fn record(&self, tenant: &str, key_id: &str, now: i64, counts: UsageCounts) {
        let day = now - now.rem_euclid(86_400);
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending
            .entry((tenant.to_string(), key_id.to_string(), day))
            .or_default()
            .add(counts);
    }

    /// Adds what was counted since the last flush to the database; on failure the counts stay
    /// pending for the next one.
    pub async fn flush(&self, store: &Store) -> Result<()> {
        let batch: Vec<(LedgerKey, UsageCounts)> = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.drain().collect()
        };
        let mut failed = None;
        let mut unsaved = Vec::new();
        for (key, counts) in batch {
            if failed.is_none() {
                match store.add_usage(&key.0, &key.1, key.2, counts).await {
                    Ok(()) => continue,
                    Err(e) => failed = Some(e),
                }
            }
            unsaved.push((key, counts));
        }
        if let Some(error) = failed {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for (key, counts) in unsaved {
                pending.entry(key).or_default().add(counts);
            }
            return Err(error);
        }
        Ok(())
    }
}
