//! 0.6.0: the Evolution servers as data (`evoq.servers`: `default`, evoq_configure's, and
//! 0.7.0: those evoq_server_add made). The SQL side (placement in the claim, evoq_server_add,
//! evoq_server_set, evoq_server_drain, evoq_server_remove, evoq_servers) is in sql/schema.sql and
//! sql/finalize.sql; this is what the Rust side reads and does for it.

use crate::errors::{EvoqError, OrRaise, SpiResult};
use pgrx::prelude::*;

/// The server evoq_configure describes.
pub use crate::reconcile::DEFAULT_SERVER;

/// Every server's name, `default` first. Before evoq_configure there is none: then `default`
/// alone, so that a job says "not configured" as it always did.
pub fn names() -> Vec<String> {
    let names: Vec<String> = Spi::connect(|client| {
        client
            .select(
                "SELECT name FROM evoq.servers ORDER BY name <> 'default', name",
                None,
                &[],
            )?
            .map(|row| row.get::<String>(1).map(Option::unwrap_or_default))
            .collect::<Result<Vec<_>, _>>()
    })
    .or_internal("reading the servers");
    if names.is_empty() {
        vec![DEFAULT_SERVER.to_string()]
    } else {
        names
    }
}

/// How many servers there are (0 before evoq_configure).
pub fn count() -> usize {
    Spi::get_one::<i64>("SELECT count(*) FROM evoq.servers")
        .or_internal("reading the servers")
        .unwrap_or(0) as usize
}

/// Raises the error for a name no server has (evoq._no_such_server: 22023 with the list, or
/// 55000 before evoq_configure).
pub fn require(name: &str) {
    let known = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM evoq.servers WHERE name = $1)",
        &[name.into()],
    )
    .or_internal("reading the servers");
    if known != Some(true) {
        Spi::run_with_args("SELECT evoq._no_such_server($1)", &[name.into()])
            .map_err(|e| EvoqError::invalid(e.to_string(), "evoq_servers lists the servers."))
            .or_raise();
    }
}

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
    use crate::errors::OrRaise;
    use pgrx::prelude::*;

    /// 0.7.0: evoq_configure's check of an API URL, for evoq_server_add and evoq_server_set
    /// (22023 with the rule it broke).
    #[pg_extern]
    #[search_path(pg_catalog, pg_temp)]
    fn _check_url(label: &str, url: &str) {
        crate::evolution::check_url(label, url)
            .map_err(|e| crate::errors::EvoqError::invalid(e.message, e.hint))
            .or_raise();
    }

    /// Wakes the background worker when the calling transaction commits: evoq_server_set and
    /// evoq_server_drain may have made room for sign-ups that wait.
    #[pg_extern]
    #[search_path(pg_catalog, pg_temp)]
    fn _wake_worker_at_commit() {
        crate::worker::wake_at_commit();
    }
}
