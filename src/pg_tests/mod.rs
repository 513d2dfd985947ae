//! The pg_test suite, one file per area. Each file holds a `#[pg_schema] mod tests` (pgrx runs
//! every test as a function in the `tests` schema, so test names are unique across files), and
//! rustfmt and clippy read them like any other module. Run with `cargo pgrx test` (see README).

mod concurrency;
mod configuration;
mod fleet;
mod hardening;
mod lifecycle;
mod phone;
mod process;
mod reconcile;
mod refresh;
mod security;
mod servers;
mod trigger;
mod webhooks;
mod worker;
