//! The two jobs pg_cron runs. Each run is one transaction:
//! claim a batch (SKIP LOCKED) → make its HTTP calls on the worker pool → record the results in
//! one set-based statement → repeat until nothing is due or the time budget is spent.

mod process;
mod refresh;
mod run;
