//! pg_cron glue: the two jobs, created or replaced by name. Their commands hold no secret; the
//! functions read the connection from evoq's private settings.
//!
//! 0.5.0: `evoq_schedule` and `evoq_unschedule` run with the CALLER's rights (not SECURITY
//! DEFINER), so pg_cron records the caller as the jobs' `username`: the jobs run as the role that
//! scheduled them, and that role sees and unschedules them (pg_cron shows and lets a role remove
//! only its own jobs). Before, they ran as the extension's owner, a superuser (on Supabase,
//! supabase_admin), so whoever could call evoq_schedule got jobs running as the superuser. The job
//! commands name evoq's functions with their schema: an unqualified name is resolved through the
//! job role's search_path, where a schema that role (or anyone with CREATE on the database) made
//! earlier in the path, `"$user"` for instance, would decide what runs. The job functions are
//! SECURITY DEFINER themselves, so the scheduling role needs only EXECUTE on them.

use crate::errors::{EvoqError, OrRaise, SpiResult};
use pgrx::prelude::*;

pub const PROCESS_JOB: &str = "process-evolution-queue";
pub const REFRESH_JOB: &str = "refresh-qr-codes";

fn require_pg_cron() -> Result<(), EvoqError> {
    let installed = Spi::get_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_cron')",
    )
    .or_internal("checking pg_cron")
    .unwrap_or(false);
    if installed {
        return Ok(());
    }
    // pg_cron lives in one database only (cron.database_name); from any other, neither
    // cron.schedule nor CREATE EXTENSION pg_cron can work, so say exactly what to run there.
    // The setting is readable by superusers only (these functions run as their caller): for
    // anyone else the message cannot name that database.
    let cron_db = crate::subxact::attempt(|| {
        Spi::get_one::<String>("SELECT current_setting('cron.database_name', true)")
            .map_err(|e| e.to_string())
    })
    .ok()
    .and_then(Result::ok)
    .flatten()
    .filter(|d| !d.is_empty());
    let here = Spi::get_one::<String>("SELECT current_database()::text")
        .or_internal("checking pg_cron")
        .unwrap_or_default();
    if let Some(cron_db) = cron_db.filter(|d| *d != here) {
        let schema = extension_schema();
        return Err(EvoqError::NotReady {
            message: format!(
                "pg_cron runs in database {cron_db:?}, not in {here:?}, so evoq cannot schedule its jobs from here"
            ),
            hint: format!(
                "Connect to {cron_db:?} and run, as the role the jobs should run as: \
                 SELECT cron.schedule_in_database('{PROCESS_JOB}', '*/5 * * * *', \
                 'SELECT {schema}.evoq_process_queue()', '{here}'); SELECT cron.schedule_in_database('{REFRESH_JOB}', \
                 '*/1 * * * *', 'SELECT {schema}.evoq_refresh_qr()', '{here}');"
            ),
        });
    }
    Err(EvoqError::MissingDependency {
        message: "pg_cron is not installed in this database, so evoq cannot schedule its jobs".into(),
        hint: "Install the pg_cron package (Debian: postgresql-15-cron), add pg_cron to shared_preload_libraries, \
               set cron.database_name to this database, restart PostgreSQL, then run CREATE EXTENSION pg_cron; \
               and SELECT evoq_schedule(); again (pg_cron can be installed in the database cron.database_name \
               names only). Without pg_cron, call evoq_process_queue() and evoq_refresh_qr() from any scheduler."
            .into(),
    })
}

/// evoq's schema, quoted as an identifier: every job command names it.
fn extension_schema() -> String {
    let schema = Spi::get_one::<String>(
        "SELECT n.nspname::text FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'evoq'",
    )
    .or_internal("checking pg_cron")
    .unwrap_or_else(|| "public".into());
    pgrx::spi::quote_identifier(&schema)
}

/// `SELECT public.evoq_process_queue()`: always schema-qualified (see the module docs).
pub fn command(function: &str) -> String {
    format!("SELECT {}.{function}()", extension_schema())
}

/// pg_cron raises a Postgres ERROR for a schedule it cannot parse; caught in a subtransaction so
/// the caller gets evoq's error with a hint instead of pg_cron's bare message.
fn schedule_job(name: &str, schedule: &str, command: &str) -> i64 {
    let scheduled = crate::subxact::attempt(|| {
        Spi::get_one_with_args::<i64>(
            "SELECT cron.schedule($1, $2, $3)",
            &[name.into(), schedule.into(), command.into()],
        )
        .map_err(|e| e.to_string())
    });
    match scheduled {
        Ok(Ok(id)) => id.unwrap_or_default(),
        Ok(Err(e)) | Err(e) => EvoqError::invalid(
            format!("pg_cron refused the schedule {schedule:?} for {name}: {e}"),
            "Use a cron expression such as '*/5 * * * *' (pg_cron 1.4 has no seconds schedules).",
        )
        .raise(),
    }
}

#[pg_extern]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn evoq_schedule(
    process_schedule: default!(&str, "'*/5 * * * *'"),
    refresh_schedule: default!(&str, "'*/1 * * * *'"),
) -> pgrx::JsonB {
    require_pg_cron().or_raise();
    let process = schedule_job(
        PROCESS_JOB,
        process_schedule,
        &command("evoq_process_queue"),
    );
    let refresh = schedule_job(REFRESH_JOB, refresh_schedule, &command("evoq_refresh_qr"));
    pgrx::JsonB(serde_json::json!({
        PROCESS_JOB: {"jobid": process, "schedule": process_schedule},
        REFRESH_JOB: {"jobid": refresh, "schedule": refresh_schedule},
    }))
}

/// Removes the caller's two jobs (pg_cron lets a role see and remove only its own; a superuser
/// sees every role's).
#[pg_extern]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn evoq_unschedule() -> i64 {
    require_pg_cron().or_raise();
    Spi::get_one::<i64>(&format!(
        "SELECT count(cron.unschedule(jobid)) FROM cron.job WHERE jobname IN ('{PROCESS_JOB}', '{REFRESH_JOB}')"
    ))
    .or_internal("checking pg_cron")
    .unwrap_or(0)
}
