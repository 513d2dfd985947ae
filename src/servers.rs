//! 0.6.0: the Evolution servers as data (`evoq.servers`, one row `default` for now). The SQL
//! side (placement in the claim, evoq_server_set, evoq_server_drain, evoq_servers) is in
//! sql/schema.sql and sql/finalize.sql; this is what the Rust side reads and does for it.

use crate::errors::SpiResult;
use pgrx::prelude::*;

/// The server every call goes to until several servers are data.
pub use crate::reconcile::DEFAULT_SERVER;

/// How many calls the server may be sent at once, if its row bounds it (`max_in_flight`).
pub fn max_in_flight(server: &str) -> Option<usize> {
    Spi::get_one_with_args::<i32>(
        "SELECT max_in_flight FROM evoq.servers WHERE name = $1",
        &[server.into()],
    )
    .or_internal("reading the server's max_in_flight")
    .map(|n| n.max(1) as usize)
}

/// Makes the server row evoq_configure describes, if missing (its own settings stay).
pub fn ensure_default() {
    Spi::run_with_args(
        "INSERT INTO evoq.servers (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
        &[DEFAULT_SERVER.into()],
    )
    .unwrap_or_else(|e| {
        crate::errors::EvoqError::internal("could not store the server", e).raise()
    });
}

#[pg_schema]
mod evoq {
    use pgrx::prelude::*;

    /// Wakes the background worker when the calling transaction commits: evoq_server_set and
    /// evoq_server_drain may have made room for sign-ups that wait.
    #[pg_extern]
    #[search_path(pg_catalog, pg_temp)]
    fn _wake_worker_at_commit() {
        crate::worker::wake_at_commit();
    }
}
