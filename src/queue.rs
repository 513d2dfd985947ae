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
    .unwrap_or_else(|e| pgrx::error!("evoq_retry failed: {e}"))
    .unwrap_or(0)
}

/// The Evolution instance name evoq uses for a user: the one already stored for them (instances
/// created by 0.1.0 keep `evoq_<hex>`), else `evoq_<namespace>_<hex>` with this deployment's
/// namespace (derived from the database's identity until evoq_configure sets one).
#[pg_extern(stable, parallel_safe, security_definer)]
#[search_path(pg_catalog, @extschema@)]
fn evoq_instance_name(user_id: pgrx::Uuid) -> String {
    let (stored, namespace) = Spi::get_two_with_args::<String, String>(
        "SELECT coalesce((SELECT instance_name FROM evolution_instances WHERE user_id = $1),
                         (SELECT instance_name FROM evolution_instance_creation_queue WHERE user_id = $1)),
                coalesce((SELECT namespace FROM evoq.settings), evoq._default_namespace())",
        &[user_id.into()],
    )
    .unwrap_or_else(|e| pgrx::error!("evoq_instance_name failed: {e}"));
    stored.unwrap_or_else(|| {
        crate::names::instance_name(
            &namespace.unwrap_or_default(),
            uuid::Uuid::from_bytes(*user_id.as_bytes()),
        )
    })
}
