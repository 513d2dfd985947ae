//! evoq: provisions an Evolution API (WhatsApp) instance for every new user profile and keeps
//! its QR code fresh, from inside PostgreSQL. This file is the table of contents.

// Pure Rust, no pgrx: tested with plain `cargo test`.
pub mod evolution;
pub mod fd_budget;
pub mod lifecycle;
pub mod listener;
pub mod names;
pub mod phone;
pub mod pipeline;
pub mod policy;
pub mod pool;
pub mod prepared_watch;
pub mod reconcile;
pub mod summary;

// Postgres-facing: SQL functions, SPI, GUCs.
mod deployment;
mod errors;
mod instances;
mod jobs;
mod queue;
mod schedule;
mod servers;
mod settings;
mod subxact;
mod trigger;
mod webhook;
mod worker;

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;
#[cfg(any(test, feature = "pg_test"))]
mod testing;
#[cfg(test)]
mod thread_births;

::pgrx::pg_module_magic!(name, version);

// Tables, indexes, views and the internal set-based statements.
::pgrx::extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
// Wrappers, grants and policies, once every function exists.
::pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[allow(non_snake_case)]
#[::pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::register_gucs();
    worker::init();
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'pg_cron'",
            "cron.database_name = 'pgrx_tests'",
            "cron.use_background_workers = on",
            "max_worker_processes = 32",
        ]
    }
}
