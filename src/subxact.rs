//! Subtransactions: run a piece of SQL work so that its failure rolls back only that piece and
//! comes back as a Rust error, while the run's transaction goes on. pgrx 0.18 has no wrapper for
//! this; it is what PL/pgSQL does for a BEGIN ... EXCEPTION block.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::PgSqlErrorCode;
use pgrx::PgTryBuilder;

/// Runs `f` in an internal subtransaction. On a Postgres ERROR (or a Rust panic) the
/// subtransaction is rolled back and the error's message returned; the outer transaction is
/// intact either way. Costs one subtransaction per call (a batch, not a row, on the normal path).
pub fn attempt<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    attempt_coded(f).map_err(|(_, message)| message)
}

/// `attempt`, and the failure's SQLSTATE beside its message (the worker's listener answers a
/// refused webhook delivery differently from a broken one).
pub fn attempt_coded<R>(f: impl FnOnce() -> R) -> Result<R, (PgSqlErrorCode, String)> {
    let f = std::panic::AssertUnwindSafe(f);
    // SAFETY: plain reads of backend globals, restored below exactly as PL/pgSQL does.
    let (context, owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    // SAFETY: starts a subtransaction; it is released or rolled back below on every path.
    // Then, as PL/pgSQL does, back to the caller's memory context: what the piece allocates
    // belongs to the caller (a batch context freed per batch), not to the subtransaction's
    // CurTransactionContext, which a commit would merge into the transaction's and keep until
    // the run ends (a 100 000-row drain held ~30 MB more before this switch).
    unsafe {
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
    }
    let restore = move || unsafe {
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
    };
    PgTryBuilder::new(move || {
        let f = f;
        let value = (f.0)();
        // SAFETY: the subtransaction begun above is the current one.
        unsafe { pg_sys::ReleaseCurrentSubTransaction() };
        restore();
        Ok(value)
    })
    .catch_others(|caught| {
        // SAFETY: the error has been caught and copied by pgrx; roll back what the piece did.
        unsafe { pg_sys::RollbackAndReleaseCurrentSubTransaction() };
        restore();
        Err(match caught {
            CaughtError::PostgresError(report)
            | CaughtError::ErrorReport(report)
            | CaughtError::RustPanic {
                ereport: report, ..
            } => (report.sql_error_code(), report.message().to_string()),
        })
    })
    .execute()
}

/// Writes one of evoq's shared rows (the circuit, the detected API version) without ever waiting
/// for another run's lock on it: that run may hold rows this one waits for (a deadlock), and a
/// lock wait is not bounded by the run's time budget. Tried with a short lock_timeout in a
/// subtransaction; if another run holds the row, this one skips the write, since that run is
/// recording the same knowledge. Returns whether the write happened.
pub fn write_shared(sql: &str, args: &[pgrx::datum::DatumWithOid]) -> bool {
    use pgrx::spi::Spi;
    let saved = Spi::get_one::<String>("SELECT pg_catalog.current_setting('lock_timeout')")
        .ok()
        .flatten()
        .unwrap_or_else(|| "0".into());
    let written = attempt(|| {
        Spi::run("SELECT pg_catalog.set_config('lock_timeout', '100ms', true)")?;
        Spi::run_with_args(sql, args)
    });
    // A rolled-back subtransaction undid the set_config; a released one kept it.
    if matches!(written, Ok(Ok(()))) {
        let _ = Spi::run_with_args(
            "SELECT pg_catalog.set_config('lock_timeout', $1, true)",
            &[saved.into()],
        );
        return true;
    }
    false
}
