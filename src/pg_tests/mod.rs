//! The pg_test suite, one file per area. Each file holds a `#[pg_schema] mod tests` (pgrx runs
//! every test as a function in the `tests` schema), so rustfmt and clippy read them like any
//! other module. The older tests still live in src/tests.rs (include!d by lib.rs) until they move.

mod hardening;
