//! Actions on one user's instance, callable by that signed-in user through PostgREST (or by a
//! role that manages instances): `evoq_reconnect` (the app's "show me a new QR" button) and
//! `evoq_deprovision` (delete the user's WhatsApp session at the server).

use crate::errors::{EvoqError, OrRaise, SpiResult};
use pgrx::prelude::*;

/// The user acting on their own instance (`evoq_current_user_id()`: Supabase's auth.uid(), or
/// the JWT's `sub` under PostgREST), or a role that may update evolution_instances itself (the
/// owner, service_role, an operator). The role is the one outside any SECURITY DEFINER function.
fn require_owner_or_manager(user_id: pgrx::Uuid, action: &str) -> Result<(), EvoqError> {
    // SAFETY: reads a backend global; always set in a running backend.
    let caller = unsafe { pg_sys::GetOuterUserId() };
    let allowed = Spi::get_one_with_args::<bool>(
        "SELECT coalesce(evoq_current_user_id() = $1, false)
             OR has_table_privilege($2, 'public.evolution_instances', 'UPDATE')",
        &[user_id.into(), caller.into()],
    )
    .or_internal("checking who is calling");
    if allowed == Some(true) {
        return Ok(());
    }
    Err(EvoqError::PermissionDenied {
        message: format!("{action}: only the user themselves may do this for their instance"),
        hint: "Call it as the signed-in user (PostgREST with their JWT) for their own user id, or as a role that may update evolution_instances.".into(),
    })
}

/// Re-arms a user's instance: a fresh QR window of `evoq.qr_window_ms`. A `close`, `refused`
/// or `expired` instance becomes `connecting` again, and the next `evoq_refresh_qr` asks the
/// server for a QR (which starts a new socket: the user asked for it). A `connecting` one just
/// gets a new window. A `lost` one that is not being created again already is queued for
/// creation. Returns the new status.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn evoq_reconnect(user_id: pgrx::Uuid) -> String {
    require_owner_or_manager(user_id, "evoq_reconnect").or_raise();
    crate::worker::wake_at_commit();
    let rearmed = Spi::get_one_with_args::<String>(
        "UPDATE evolution_instances i SET
             instance_status = 'connecting', connecting_since = clock_timestamp(), last_refresh_at = NULL,
             qr_code = CASE WHEN i.instance_status = 'connecting' THEN i.qr_code END,
             qr_text = CASE WHEN i.instance_status = 'connecting' THEN i.qr_text END,
             pairing_code = CASE WHEN i.instance_status = 'connecting' THEN i.pairing_code END,
             no_qr_rounds = 0, disconnected_at = NULL, disconnect_reason = NULL,
             server_loop_deliveries = 0, server_loop_seen_at = NULL, server_loop_logouts = 0,
             server_loop_logout_at = NULL,
             last_error = NULL, last_error_at = NULL, updated_at = clock_timestamp()
         WHERE i.user_id = $1 AND i.instance_status IN ('connecting', 'close', 'refused', 'expired')
         RETURNING i.instance_status",
        &[user_id.into()],
    )
    .or_internal("re-arming an instance");
    if let Some(status) = rearmed {
        return status;
    }
    // Lost while idle (the server deleted it): the user asks for it again, so create it again.
    let recreate = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM evolution_instances i
                        JOIN evolution_instance_creation_queue q USING (user_id)
                        WHERE i.user_id = $1 AND i.instance_status = 'lost'
                          AND q.action = 'create' AND q.status IN ('completed', 'failed'))",
        &[user_id.into()],
    )
    .or_internal("reading an instance");
    if recreate == Some(true) {
        crate::queue::request_requeue(user_id, "lost").unwrap_or_else(|e| {
            EvoqError::internal("could not queue the instance again", e).raise()
        });
        return "lost".into();
    }
    let status = Spi::get_one_with_args::<String>(
        "SELECT instance_status FROM evolution_instances WHERE user_id = $1",
        &[user_id.into()],
    )
    .or_internal("reading an instance");
    let (message, hint) = match status.as_deref() {
        Some("open") => (
            "the instance is connected already",
            "Nothing to reconnect: the user's phone is linked.",
        ),
        Some("lost") => (
            "the instance is being created again (the server lost it)",
            "Its new QR comes with the creation; evoq_process_queue runs it.",
        ),
        Some("deleted") => (
            "the instance was deprovisioned",
            "A new profile row for the user creates a new instance.",
        ),
        _ => (
            "the user has no instance yet",
            "It is created from the queue (evolution_instance_creation_queue) by evoq_process_queue.",
        ),
    };
    EvoqError::NotReady {
        message: format!("evoq_reconnect: {message}"),
        hint: hint.into(),
    }
    .raise()
}

/// Queues the deletion of a user's instance, exactly as deleting their profile row does: a
/// pending creation becomes a deletion (nothing is created), and evoq_process_queue logs the
/// instance out and deletes it at the server, with its retries (404: done). Returns `queued`,
/// `waiting` (a running job holds the row; its next run applies it), `done` (deleted already)
/// or `nothing` (evoq never queued this user).
#[pg_extern(security_definer)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn evoq_deprovision(user_id: pgrx::Uuid) -> String {
    require_owner_or_manager(user_id, "evoq_deprovision").or_raise();
    crate::queue::request_requeue(user_id, "deprovision")
        .unwrap_or_else(|e| EvoqError::internal("could not queue a deprovisioning", e).raise());
    let state = Spi::get_three_with_args::<String, String, bool>(
        "SELECT q.action, q.status,
                EXISTS (SELECT 1 FROM evoq.requeue_requests r WHERE r.user_id = $1)
         FROM (SELECT 1) one
         LEFT JOIN evolution_instance_creation_queue q ON q.user_id = $1",
        &[user_id.into()],
    )
    .or_internal("reading the queue");
    match state {
        (_, _, Some(true)) => "waiting",
        (Some(a), Some(s), _) if a == "delete" && s == "completed" => "done",
        (Some(a), _, _) if a == "delete" => "queued",
        _ => "nothing",
    }
    .into()
}

/// "Link with phone number" for the signed-in user (`evoq_current_user_id()`): a pairing code
/// instead of a QR. See [`link_with_phone`].
#[pg_extern(security_definer, name = "evoq_link_with_phone")]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn evoq_link_with_phone_self(phone: &str) -> String {
    let me = Spi::get_one::<pgrx::Uuid>("SELECT evoq_current_user_id()")
        .or_internal("reading the signed-in user");
    let Some(user_id) = me else {
        EvoqError::PermissionDenied {
            message: "evoq_link_with_phone: no signed-in user".into(),
            hint: "Call it as the signed-in user (PostgREST with their JWT), or as an operator with evoq_link_with_phone(user_id, phone).".into(),
        }
        .raise()
    };
    link_with_phone(user_id, phone)
}

/// The operator's form (and the user's, for their own id): see [`link_with_phone`].
#[pg_extern(security_definer, name = "evoq_link_with_phone")]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn evoq_link_with_phone_for(user_id: pgrx::Uuid, phone: &str) -> String {
    link_with_phone(user_id, phone)
}

/// Asks for a pairing code for the user's instance: the number (normalised; see `phone`) is kept
/// in `evoq.phone_links` until the server has it, and the next QR refresh logs the instance out
/// and connects it with the number (the Evolution API ignores a number while `connecting`). The
/// code lands in `pairing_code` with the QR it came with (`last_qr_update`), NOTIFY included.
/// From `connecting`, `close`, `refused` or `expired`: a new QR window, returns `connecting`.
/// Before the instance exists (its creation queued), or while it is being created again: the
/// create carries the number, returns `queued`. Refused: an open or deprovisioned instance, a
/// user evoq never queued, a failed creation; nothing changes then.
fn link_with_phone(user_id: pgrx::Uuid, input: &str) -> String {
    const WHAT: &str = "evoq_link_with_phone";
    require_owner_or_manager(user_id, WHAT).or_raise();
    let phone = crate::phone::Phone::parse(input).unwrap_or_else(|e| {
        EvoqError::invalid(
            format!("{WHAT}: {e}"),
            "Give the number with its country code: digits, optionally a leading + and spaces, e.g. '+1 415 555 0100'.",
        )
        .raise()
    });
    let not_ready = |message: &str, hint: &str| -> ! {
        EvoqError::NotReady {
            message: format!("{WHAT}: {message}"),
            hint: hint.into(),
        }
        .raise()
    };
    // Locked, so a refresh recording a result for it meanwhile drops its result (SKIP LOCKED)
    // instead of overwriting the new window.
    let status = Spi::get_one_with_args::<String>(
        "SELECT instance_status FROM public.evolution_instances WHERE user_id = $1 FOR UPDATE",
        &[user_id.into()],
    )
    .or_internal("reading an instance");
    let queued = Spi::get_two_with_args::<String, String>(
        "SELECT q.action, q.status FROM (SELECT 1) one
         LEFT JOIN public.evolution_instance_creation_queue q ON q.user_id = $1",
        &[user_id.into()],
    )
    .or_internal("reading the queue");
    let (action, qstatus) = queued;
    let (action, qstatus) = (action.unwrap_or_default(), qstatus.unwrap_or_default());
    if status.as_deref() == Some("open") {
        not_ready(
            "the instance is linked already",
            "Nothing to link: the user's phone is connected.",
        );
    }
    if status.as_deref() == Some("deleted") || action == "delete" {
        not_ready(
            "the user's instance was deprovisioned",
            "A new profile row for the user creates a new instance.",
        );
    }
    // The same number asked again while its pairing is pending: nothing to do (each pairing is
    // a logout and a new socket at the server; a user must not be able to make them at will).
    let pending = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM evoq.phone_links WHERE user_id = $1 AND phone = $2)",
        &[user_id.into(), phone.digits().into()],
    )
    .or_internal("reading the phone links");
    if pending == Some(true) && status.as_deref() == Some("connecting") {
        return "connecting".into();
    }
    Spi::run_with_args(
        "INSERT INTO evoq.phone_links AS p (user_id, phone) VALUES ($1, $2)
         ON CONFLICT (user_id) DO UPDATE SET phone = excluded.phone, requested_at = clock_timestamp()",
        &[user_id.into(), phone.digits().into()],
    )
    .or_internal("keeping the phone number");
    let outcome = match status.as_deref() {
        Some("connecting" | "close" | "refused" | "expired") => {
            // Paired at once, unless a pairing was sent within evoq.qr_refresh_interval_ms: a
            // new number then waits at most that long, and calls in a row cannot make the
            // server log out and connect again and again.
            Spi::run_with_args(
                "UPDATE public.evolution_instances i SET
                     instance_status = 'connecting', connecting_since = clock_timestamp(),
                     last_refresh_at = CASE WHEN i.pairing_requested_at > clock_timestamp() - $2 * interval '1 millisecond'
                                            THEN i.last_refresh_at END,
                     qr_code = NULL, qr_text = NULL, pairing_code = NULL, no_qr_rounds = 0,
                     disconnected_at = NULL, disconnect_reason = NULL,
                     server_loop_deliveries = 0, server_loop_seen_at = NULL, server_loop_logouts = 0,
                     server_loop_logout_at = NULL,
                     last_error = NULL, last_error_at = NULL, updated_at = clock_timestamp()
                 WHERE i.user_id = $1",
                &[
                    user_id.into(),
                    crate::settings::tunables().qr_refresh_interval_ms.into(),
                ],
            )
            .or_internal("re-arming an instance");
            "connecting"
        }
        // The server lost it: created again, and the create carries the number.
        Some("lost") => {
            if !(action == "create" && (qstatus == "pending" || qstatus == "processing")) {
                crate::queue::request_requeue(user_id, "lost").unwrap_or_else(|e| {
                    EvoqError::internal("could not queue the instance again", e).raise()
                });
            }
            "queued"
        }
        Some(other) => not_ready(
            &format!("the instance is {other}"),
            "Only an unlinked instance (connecting, close, refused, expired, lost) can be linked.",
        ),
        None if action == "create" && (qstatus == "pending" || qstatus == "processing") => "queued",
        None if qstatus == "failed" => not_ready(
            "the user's instance could not be created",
            "Its creation failed for good (see evolution_instance_creation_queue.error_message); evoq_retry(user_id) tries again, then link.",
        ),
        None => not_ready(
            "the user has no instance and none is queued",
            "evoq queues a user when their profile row is inserted into the table given to evoq_attach.",
        ),
    };
    crate::worker::wake_at_commit();
    outcome.into()
}
