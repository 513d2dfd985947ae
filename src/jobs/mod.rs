//! The two jobs pg_cron runs, and the background worker too. A SQL function's run is one
//! transaction streaming through `crate::pipeline`: claims fill the free slots of the pool
//! (SKIP LOCKED), results are recorded in groups by set-based statements, until nothing is due
//! or the time budget is spent. The worker drives the same sources across many transactions.

pub mod lanes;
pub mod process;
pub mod readiness;
pub mod reconcile;
pub mod refresh;
pub mod run;
