//! Subtransactions: run a piece of SQL work so that its failure rolls back only that piece and
//! comes back as a Rust error, while the run's transaction goes on. pgrx 0.18 has no wrapper for
//! this; it is what PL/pgSQL does for a BEGIN ... EXCEPTION block.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::PgTryBuilder;

/// Runs `f` in an internal subtransaction. On a Postgres ERROR (or a Rust panic) the
/// subtransaction is rolled back and the error's message returned; the outer transaction is
/// intact either way. Costs a subtransaction, so callers use it on a fallback path only.
pub fn attempt<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    let f = std::panic::AssertUnwindSafe(f);
    // SAFETY: plain reads of backend globals, restored below exactly as PL/pgSQL does.
    let (context, owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    unsafe { pg_sys::BeginInternalSubTransaction(std::ptr::null()) };
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
            } => report.message().to_string(),
        })
    })
    .execute()
}
