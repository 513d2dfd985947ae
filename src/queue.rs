//! The queue: asking for a row to be requeued, and the operators' evoq_retry.

use pgrx::prelude::*;

/// Asks for one user's queue row to be requeued (`reason`: `reinserted`, `lost` or
/// `deprovision`; evoq._apply_requeue_requests says what each means) and applies it at once
/// unless a job holds the row, whose next run then applies it. Never waits on a lock.
/// Two statements: a row inserted by a CTE would not be visible to the function it calls.
pub fn request_requeue(user_id: pgrx::Uuid, reason: &str) -> Result<(), pgrx::spi::Error> {
    Spi::run_with_args(
        "INSERT INTO evoq.requeue_requests (user_id, reason) VALUES ($1, $2)",
        &[user_id.into(), reason.into()],
    )?;
    crate::worker::wake_at_commit();
    Spi::run_with_args("SELECT evoq._apply_requeue_requests($1)", &[user_id.into()])
}

/// Puts failed rows back to pending (all of them, or one user's), with a fresh attempt budget.
/// Returns how many rows it re-queued.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn evoq_retry(user_id: default!(Option<pgrx::Uuid>, "NULL")) -> i64 {
    crate::worker::wake_at_commit();
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
