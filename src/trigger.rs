//! The profile trigger and the function that attaches it to the application's table.
//!
//! The trigger does local inserts through plans prepared once per backend, no network I/O, and
//! never waits on a lock a job holds: a profile insert must never wait for, or fail because of,
//! the Evolution API or evoq's own runs.

use crate::errors::{EvoqError, OrRaise, SpiResult};
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::PgOid;
use std::cell::RefCell;

pub const TRIGGER_NAME: &str = "on_profile_created_create_evolution_instance";
/// 0.3.0: deleting the profile row deprovisions the user's instance.
pub const DELETE_TRIGGER_NAME: &str = "on_profile_deleted_delete_evolution_instance";

/// A new user: one insert. The NOT EXISTS reads the committed state without a lock, so a user
/// already queued (whose row a running job may hold locked) inserts nothing here and never
/// reaches the unique index's wait.
const ENQUEUE_NEW: &str = "
    INSERT INTO evolution_instance_creation_queue (user_id)
    SELECT $1 WHERE NOT EXISTS (SELECT 1 FROM evolution_instance_creation_queue WHERE user_id = $1)
    ON CONFLICT (user_id) DO NOTHING";

const RECORD_SKIP: &str = "INSERT INTO evoq.skipped_profiles (table_name, reason) VALUES ($1, $2)";

/// 0.5.0: the number from the profile's phone column (evoq_attach's `phone_column`), kept for
/// the create. A user who asked for a link meanwhile keeps theirs.
const KEEP_PHONE: &str = "INSERT INTO evoq.phone_links (user_id, phone) VALUES ($1, $2)
    ON CONFLICT (user_id) DO NOTHING";

thread_local! {
    // Postgres backends are single-threaded; the plan lives as long as the backend and is
    // revalidated by the plan cache if the table changes.
    static ENQUEUE_PLAN: RefCell<Option<OwnedPreparedStatement>> = const { RefCell::new(None) };
}

fn enqueue(user_id: pgrx::Uuid) -> Result<(), pgrx::spi::Error> {
    let inserted = ENQUEUE_PLAN.with(|cell| {
        let mut slot = cell.borrow_mut();
        Spi::connect_mut(|client| {
            if slot.is_none() {
                let plan = client.prepare_mut(ENQUEUE_NEW, &[PgOid::from(pg_sys::UUIDOID)])?;
                *slot = Some(plan.keep());
            }
            let plan = slot.as_ref().expect("prepared above");
            Ok::<_, pgrx::spi::Error>(!client.update(plan, None, &[user_id.into()])?.is_empty())
        })
    })?;
    // The background worker, if one runs, claims the row as soon as this transaction commits.
    crate::worker::wake_at_commit();
    if !inserted {
        // The rare path (a profile inserted again): a new request (new request_id, retry_count
        // + 1) whatever state the row was in, never a wait. In a subtransaction: between
        // installing new evoq files and ALTER EXTENSION evoq UPDATE, the tables it writes may not
        // exist yet, and that must not fail the application's insert.
        let requeued = crate::subxact::attempt(|| {
            crate::queue::request_requeue(user_id, "reinserted").map_err(|e| e.to_string())
        });
        if let Some(e) = requeued.and_then(|r| r).err() {
            pgrx::warning!(
                "evoq: profile inserted again, but its user could not be queued again: {e}"
            );
        }
    }
    Ok(())
}

/// A row that cannot be queued: a WARNING for the inserting session, and a row in
/// evoq.skipped_profiles so operators see it in evoq_status (a warning alone goes unread). In a
/// subtransaction, like the requeue above: a profile insert never fails because of evoq.
fn skip(trigger: &pgrx::PgTrigger, why: String) {
    let table = trigger.table_name().unwrap_or_else(|_| "?".into());
    pgrx::warning!("evoq: profile row in {table} not queued: {why}");
    let _ =
        crate::subxact::attempt(|| Spi::run_with_args(RECORD_SKIP, &[table.into(), why.into()]));
}

/// The user id column named in CREATE TRIGGER (TG_ARGV[0]), read in place: this runs for
/// every inserted profile, so nothing is allocated or looked up unless a row must be skipped.
fn user_id_column<'a>(trigger: &'a pgrx::PgTrigger<'a>) -> &'a str {
    trigger_arg(trigger, 0).unwrap_or("id")
}

/// TG_ARGV[i], if the trigger has it.
fn trigger_arg<'a>(trigger: &'a pgrx::PgTrigger<'a>, i: usize) -> Option<&'a str> {
    let t = trigger.trigger();
    if (t.tgnargs as usize) <= i || t.tgargs.is_null() {
        return None;
    }
    // SAFETY: Postgres hands the trigger tgnargs valid NUL-terminated argument strings that live
    // as long as the trigger data; i < tgnargs.
    unsafe { std::ffi::CStr::from_ptr(*t.tgargs.add(i)) }
        .to_str()
        .ok()
}

/// 0.5.0: the profile's phone number (TG_ARGV[1], evoq_attach's `phone_column`), kept so the
/// create carries it and the user's first pairing code comes with it. A NULL or empty column is
/// no number; one that is not a phone number is skipped with a WARNING that does not quote it
/// (the profile is queued all the same). In a subtransaction: never fails the insert.
fn keep_phone(
    trigger: &pgrx::PgTrigger,
    new: &PgHeapTuple<AllocatedByPostgres>,
    user_id: pgrx::Uuid,
) {
    let Some(column) = trigger_arg(trigger, 1) else {
        return;
    };
    let value = match new.get_by_name::<String>(column) {
        Ok(Some(v)) if !v.trim().is_empty() => v,
        Ok(_) => return,
        Err(e) => {
            pgrx::warning!("evoq: phone column {column} cannot be read as text ({e}); the user is queued without it");
            return;
        }
    };
    match crate::phone::Phone::parse(&value) {
        Ok(phone) => {
            let kept = crate::subxact::attempt(|| {
                Spi::run_with_args(KEEP_PHONE, &[user_id.into(), phone.digits().into()])
            });
            let failed = match kept {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e),
            };
            if let Some(e) = failed {
                pgrx::warning!("evoq: the phone number of a new profile could not be kept: {e}");
            }
        }
        Err(e) => pgrx::warning!(
            "evoq: column {column} of a new profile is not a phone number evoq can use ({e}); the user is queued without it"
        ),
    }
}

#[pg_trigger]
fn handle_profile_evolution_instance<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::spi::Error> {
    let column = user_id_column(trigger);
    let Some(new) = trigger.new() else {
        return Ok(None);
    };
    match new.get_by_name::<pgrx::Uuid>(column) {
        Ok(Some(user_id)) => {
            enqueue(user_id)?;
            keep_phone(trigger, &new, user_id);
        }
        Ok(None) => skip(trigger, format!("column {column} is NULL")),
        Err(e) => skip(
            trigger,
            format!("column {column} cannot be read as uuid ({e})"),
        ),
    }
    Ok(None)
}

/// A deleted profile: its user's instance is deleted at the server (or its creation cancelled if
/// never tried). Like the insert trigger, never a wait and never a failed DELETE because of evoq.
#[pg_trigger]
fn handle_profile_evolution_instance_delete<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::spi::Error> {
    let column = user_id_column(trigger);
    let Some(old) = trigger.old() else {
        return Ok(None);
    };
    match old.get_by_name::<pgrx::Uuid>(column) {
        Ok(Some(user_id)) => {
            let queued = crate::subxact::attempt(|| {
                crate::queue::request_requeue(user_id, "deprovision").map_err(|e| e.to_string())
            });
            if let Some(e) = queued.and_then(|r| r).err() {
                pgrx::warning!(
                    "evoq: profile deleted, but its instance could not be queued for deletion: {e}"
                );
            }
        }
        Ok(None) => skip(trigger, format!("column {column} is NULL")),
        Err(e) => skip(
            trigger,
            format!("column {column} cannot be read as uuid ({e})"),
        ),
    }
    Ok(None)
}

/// Where the extension lives, quoted, for the trigger's EXECUTE FUNCTION clause.
fn extension_schema() -> String {
    Spi::get_one::<String>(
        "SELECT quote_ident(n.nspname) FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
         WHERE e.extname = 'evoq'",
    )
    .or_internal("reading the catalog")
    .unwrap_or_else(|| "public".into())
}

/// The type of `table`'s column `column`, if it has one.
fn column_type(table: pg_sys::Oid, column: &str) -> Option<String> {
    Spi::get_one_with_args::<String>(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
         WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped",
        &[table.into(), column.into()],
    )
    .or_internal("reading the catalog")
}

/// 0.5.0: the phone column given to evoq_attach must exist and hold text.
fn check_phone_column(table: pg_sys::Oid, name: &str, column: &str) -> Result<(), EvoqError> {
    match column_type(table, column).as_deref() {
        None => Err(EvoqError::BadTarget {
            message: format!("table {name} has no column {column:?}"),
            hint: "Pass the column that holds the user's WhatsApp number: evoq_attach('profiles', phone_column => 'phone').".into(),
        }),
        // text and varchar only: a character(n) value is blank-padded, and is not read as text
        // without a cast the trigger does not make.
        Some(t) if t == "text" || t.starts_with("character varying") => Ok(()),
        Some(other) => Err(EvoqError::BadTarget {
            message: format!("column {column:?} of {name} is {other}, not text"),
            hint: "A phone number is text (digits with the country code, e.g. '+55 11 98765 4321').".into(),
        }),
    }
}

fn check_target(table: pg_sys::Oid, column: &str) -> Result<String, EvoqError> {
    let (name, relkind) = Spi::get_two_with_args::<String, String>(
        "SELECT c.oid::regclass::text, c.relkind::text FROM pg_class c WHERE c.oid = $1",
        &[table.into()],
    )
    .or_internal("reading the catalog");
    let name = name.ok_or_else(|| EvoqError::BadTarget {
        message: "the table given to evoq_attach does not exist".into(),
        hint: "Pass the profiles table, e.g. evoq_attach('public.profiles').".into(),
    })?;
    if !matches!(relkind.as_deref(), Some("r") | Some("p")) {
        return Err(EvoqError::BadTarget {
            message: format!("{name} is not a table"),
            hint: "evoq_attach needs the table that receives one row per new user.".into(),
        });
    }
    match column_type(table, column).as_deref() {
        None => Err(EvoqError::BadTarget {
            message: format!("table {name} has no column {column:?}"),
            hint: "Pass the column that holds the user id: evoq_attach('profiles', user_id_column => 'user_id').".into(),
        }),
        Some("uuid") => Ok(name),
        Some(other) => Err(EvoqError::BadTarget {
            message: format!("column {column:?} of {name} is {other}, not uuid"),
            hint: "evoq keys users by uuid (as Supabase's auth.users does); point it at a uuid column.".into(),
        }),
    }
}

/// evoq_attach and evoq_detach run as the extension owner (so GRANT EXECUTE is all a role needs),
/// but act only where the calling role could create a trigger itself: the role in effect outside
/// any SECURITY DEFINER function (`GetOuterUserId`, what SET ROLE set) must own the table or hold
/// TRIGGER on it.
fn require_trigger_privilege(table: pg_sys::Oid) -> Result<(), EvoqError> {
    // SAFETY: reads a backend global; always set in a running backend.
    let caller = unsafe { pg_sys::GetOuterUserId() };
    let (allowed, role, name) = Spi::get_three_with_args::<bool, String, String>(
        "SELECT has_table_privilege($1, $2, 'TRIGGER'), (SELECT rolname::text FROM pg_roles WHERE oid = $1),
                $2::regclass::text",
        &[caller.into(), table.into()],
    )
    .or_internal("reading the catalog");
    if allowed == Some(true) {
        return Ok(());
    }
    Err(EvoqError::PermissionDenied {
        message: format!(
            "role {} may not create triggers on {}",
            role.unwrap_or_default(),
            name.unwrap_or_default()
        ),
        hint: "evoq_attach and evoq_detach act for the calling role: it must own the table or hold the TRIGGER privilege on it."
            .into(),
    })
}

/// The regclass-typed SQL wrappers `evoq_attach`/`evoq_detach` (sql/finalize.sql) call these;
/// they live in the private schema `evoq`.
#[pg_schema]
mod evoq {
    use super::*;

    /// Creates (or replaces) the trigger `on_profile_created_create_evolution_instance` AFTER
    /// INSERT FOR EACH ROW on `table`, reading the user id from `user_id_column`. Called by the SQL
    /// wrapper `evoq_attach(regclass, name)` (sql/finalize.sql), which gives it the regclass type.
    #[pg_extern]
    #[search_path(pg_catalog, @extschema@, pg_temp)]
    fn attach_trigger(table: pg_sys::Oid, user_id_column: &str) -> String {
        attach(table, user_id_column, None)
    }

    /// 0.5.0: with the column that holds the user's phone number (NULL: none), whose number
    /// the create then carries for a pairing code. Called by `evoq_attach(regclass, name,
    /// name)`; the two-argument form stays for the SQL of earlier versions.
    #[pg_extern]
    #[search_path(pg_catalog, @extschema@, pg_temp)]
    fn attach_trigger_with_phone(
        table: pg_sys::Oid,
        user_id_column: &str,
        phone_column: Option<&str>,
    ) -> String {
        attach(table, user_id_column, phone_column)
    }

    fn attach(table: pg_sys::Oid, user_id_column: &str, phone_column: Option<&str>) -> String {
        let name = check_target(table, user_id_column).or_raise();
        if let Some(phone) = phone_column {
            check_phone_column(table, &name, phone).or_raise();
        }
        require_trigger_privilege(table).or_raise();
        let schema = extension_schema();
        for (trigger, event, function) in [
            (TRIGGER_NAME, "INSERT", "handle_profile_evolution_instance"),
            (
                DELETE_TRIGGER_NAME,
                "DELETE",
                "handle_profile_evolution_instance_delete",
            ),
        ] {
            // Checked first: DROP TRIGGER IF EXISTS would print a NOTICE for every first attach.
            let exists = Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1 AND tgname = $2)",
                &[table.into(), trigger.into()],
            )
            .or_internal("reading the catalog")
            .unwrap_or(false);
            if exists {
                Spi::run(&format!("DROP TRIGGER {trigger} ON {name}")).unwrap_or_else(|e| {
                    EvoqError::internal(&format!("could not replace the trigger on {name}"), e)
                        .raise()
                });
            }
            // The insert trigger gets the phone column as its second argument.
            let mut args = pgrx::spi::quote_literal(user_id_column);
            if let (Some(phone), "INSERT") = (phone_column, event) {
                args = format!("{args}, {}", pgrx::spi::quote_literal(phone));
            }
            Spi::run(&format!(
                "CREATE TRIGGER {trigger} AFTER {event} ON {name}
                     FOR EACH ROW EXECUTE FUNCTION {schema}.{function}({args})"
            ))
            .unwrap_or_else(|e| {
                EvoqError::internal(&format!("could not create the trigger on {name}"), e).raise()
            });
        }
        let phone = phone_column
            .map(|p| format!(", phone column {p}"))
            .unwrap_or_default();
        format!(
            "triggers {TRIGGER_NAME} and {DELETE_TRIGGER_NAME} created on {name} (user id column {user_id_column}{phone})"
        )
    }

    /// Removes the trigger again (wrapped by `evoq_detach(regclass)`).
    #[pg_extern]
    #[search_path(pg_catalog, @extschema@, pg_temp)]
    fn detach_trigger(table: pg_sys::Oid) -> String {
        require_trigger_privilege(table).or_raise();
        let name = Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[table.into()])
            .or_internal("reading the catalog")
            .unwrap_or_default();
        for trigger in [TRIGGER_NAME, DELETE_TRIGGER_NAME] {
            Spi::run(&format!("DROP TRIGGER IF EXISTS {trigger} ON {name}")).unwrap_or_else(|e| {
                EvoqError::internal(&format!("could not drop the trigger on {name}"), e).raise()
            });
        }
        format!("triggers {TRIGGER_NAME} and {DELETE_TRIGGER_NAME} dropped from {name}")
    }
}
