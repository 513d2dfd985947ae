//! Operator actions on the queue.

use pgrx::prelude::*;

/// Puts failed rows back to pending (all of them, or one user's), with a fresh attempt budget.
/// Returns how many rows it re-queued.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, @extschema@)]
fn evoq_retry(user_id: default!(Option<pgrx::Uuid>, "NULL")) -> i64 {
    Spi::get_one_with_args::<i64>(
        "WITH requeued AS (
             UPDATE evolution_instance_creation_queue
             SET status = 'pending', attempts = 0, next_attempt_at = now(), error_kind = NULL, updated_at = now()
             WHERE status = 'failed' AND ($1::uuid IS NULL OR user_id = $1)
             RETURNING 1)
         SELECT count(*) FROM requeued",
        &[user_id.into()],
    )
    .unwrap_or_else(|e| crate::errors::EvoqError::internal("evoq_retry failed", e).raise())
    .unwrap_or(0)
}
