//! An instance's life: its states and what each webhook delivery may do to them. Pure logic;
//! `webhook.rs` applies it in one guarded UPDATE, so the rules below are the whole story.
//!
//! The state machine decides, not arrival order: a delivery names the states it may move a row
//! out of, and from any other state it changes nothing. A replayed `open` finds the row open and
//! changes nothing; a late `connecting` never moves an open row back; a QR that arrives after the
//! scan finds the row open and is dropped. Between deliveries of one server, the server's own
//! `date_time` breaks the remaining ties (a late `open` after a newer `close`).

use crate::evolution::{Change, Connection, Qr};

/// `evolution_instances.instance_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Waiting for a QR scan; evoq keeps its QR fresh.
    Connecting,
    /// Connected to the user's phone.
    Open,
    /// Disconnected for good: logged out from the phone or by a logout (why: `disconnect_reason`).
    Close,
    /// The server stopped issuing QRs (its QR limit, about 22 minutes without a scan).
    Refused,
    /// Not scanned within evoq's QR window: evoq logged it out so it costs the server nothing.
    Expired,
    /// The server no longer knows the instance (404); its creation is queued again.
    Lost,
    /// Deprovisioned: deleted at the server because its user is gone.
    Deleted,
}

pub const ALL_STATUSES: [Status; 7] = [
    Status::Connecting,
    Status::Open,
    Status::Close,
    Status::Refused,
    Status::Expired,
    Status::Lost,
    Status::Deleted,
];

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Connecting => "connecting",
            Status::Open => "open",
            Status::Close => "close",
            Status::Refused => "refused",
            Status::Expired => "expired",
            Status::Lost => "lost",
            Status::Deleted => "deleted",
        }
    }
}

/// What an applicable delivery writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// The server's current QR (the status stays `connecting`).
    Qr(Qr),
    /// Connected: the owner's number and profile name when the server sent them.
    Opened {
        number: Option<String>,
        profile_name: Option<String>,
    },
    /// Disconnected for good, and why.
    Closed { reason: String },
    /// The QR limit.
    Refused,
    /// Gone from the server. `lost`; created again from a live state only (connecting, open),
    /// an idle one by `evoq_reconnect`; `deleted` if its user is being deprovisioned (the SQL
    /// knows both, `evoq._apply_delivery`).
    Removed,
}

/// A delivery that applies: from which states, to which one, writing what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub from: &'static [Status],
    pub to: Status,
    pub write: Write,
}

/// What evoq does with a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Apply(Step),
    /// Nothing to change, and why (counted as ignored).
    Ignore(&'static str),
    /// An event evoq does not consume: kept for the application.
    Relay,
}

const LIVE: &[Status] = &[Status::Connecting, Status::Open];
/// Every state the server still holds an instance in.
const ON_SERVER: &[Status] = &[
    Status::Connecting,
    Status::Open,
    Status::Close,
    Status::Refused,
    Status::Expired,
];

/// The `statusReason` of a close the server does not recover from by itself (v2 reconnects
/// after any other, and sends nothing then; v1.8 reports every close, 408 included).
pub fn is_final_close(status_reason: Option<i64>) -> bool {
    matches!(status_reason, Some(401..=403) | Some(406))
}

/// Why a final close happened, in words for the row.
pub fn close_reason(status_reason: Option<i64>) -> String {
    match status_reason {
        Some(401) => {
            "logged out: the device was unlinked from the phone, or logged out (401)".into()
        }
        Some(403) => "WhatsApp refused the session (403)".into(),
        Some(code) => format!("WhatsApp ended the session ({code})"),
        None => "the session ended".into(),
    }
}

pub fn effect(change: &Change) -> Effect {
    match change {
        Change::NewQr(qr) => Effect::Apply(Step {
            from: &[Status::Connecting],
            to: Status::Connecting,
            write: Write::Qr(qr.clone()),
        }),
        Change::QrLimit
        | Change::Connection {
            state: Connection::Refused,
            ..
        } => Effect::Apply(Step {
            from: &[Status::Connecting],
            to: Status::Refused,
            write: Write::Refused,
        }),
        Change::Connection {
            state: Connection::Open,
            number,
            profile_name,
            ..
        } => Effect::Apply(Step {
            // A scan after evoq gave up on the row is still a scan: the server is the truth.
            from: ON_SERVER,
            to: Status::Open,
            write: Write::Opened {
                number: number.clone(),
                profile_name: profile_name.clone(),
            },
        }),
        Change::Connection {
            state: Connection::Close,
            status_reason,
            ..
        } => {
            if is_final_close(*status_reason) {
                Effect::Apply(Step {
                    from: LIVE,
                    to: Status::Close,
                    write: Write::Closed {
                        reason: close_reason(*status_reason),
                    },
                })
            } else {
                Effect::Ignore("a close the server recovers from by itself")
            }
        }
        Change::Connection {
            state: Connection::Connecting,
            ..
        } => Effect::Ignore(
            "connecting: nothing to change (only evoq_reconnect re-arms an instance)",
        ),
        Change::LoggedOut => Effect::Apply(Step {
            from: LIVE,
            to: Status::Close,
            write: Write::Closed {
                reason: close_reason(Some(401)),
            },
        }),
        Change::Removed => Effect::Apply(Step {
            from: ON_SERVER,
            to: Status::Lost,
            write: Write::Removed,
        }),
        Change::Other => Effect::Relay,
        Change::Incomplete(why) => Effect::Ignore(why),
    }
}

/// Where a row in `from` ends up after `change`; None when the delivery changes nothing.
pub fn next(from: Status, change: &Change) -> Option<Status> {
    match effect(change) {
        Effect::Apply(step) if step.from.contains(&from) => Some(step.to),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qr() -> Change {
        Change::NewQr(Qr {
            code: Some("2@x".into()),
            ..Qr::default()
        })
    }

    fn conn(state: Connection, reason: Option<i64>) -> Change {
        Change::Connection {
            state,
            status_reason: reason,
            number: None,
            profile_name: None,
        }
    }

    fn every_change() -> Vec<Change> {
        vec![
            qr(),
            Change::QrLimit,
            conn(Connection::Connecting, Some(200)),
            conn(Connection::Open, Some(200)),
            conn(Connection::Close, Some(401)),
            conn(Connection::Close, Some(408)),
            conn(Connection::Close, None),
            conn(Connection::Refused, Some(428)),
            Change::LoggedOut,
            Change::Removed,
            Change::Other,
            Change::Incomplete("x"),
        ]
    }

    /// The transition table the README shows, row by row.
    #[test]
    fn the_transition_table() {
        use Status::*;
        let cases: &[(Change, [Option<Status>; 7])] = &[
            // from: connecting, open, close, refused, expired, lost, deleted
            (qr(), [Some(Connecting), None, None, None, None, None, None]),
            (
                Change::QrLimit,
                [Some(Refused), None, None, None, None, None, None],
            ),
            (
                conn(Connection::Refused, Some(428)),
                [Some(Refused), None, None, None, None, None, None],
            ),
            (
                conn(Connection::Open, Some(200)),
                [
                    Some(Open),
                    Some(Open),
                    Some(Open),
                    Some(Open),
                    Some(Open),
                    None,
                    None,
                ],
            ),
            (
                conn(Connection::Close, Some(401)),
                [Some(Close), Some(Close), None, None, None, None, None],
            ),
            (
                Change::LoggedOut,
                [Some(Close), Some(Close), None, None, None, None, None],
            ),
            (
                Change::Removed,
                [
                    Some(Lost),
                    Some(Lost),
                    Some(Lost),
                    Some(Lost),
                    Some(Lost),
                    None,
                    None,
                ],
            ),
            (conn(Connection::Close, Some(408)), [None; 7]),
            (conn(Connection::Connecting, Some(200)), [None; 7]),
            (Change::Other, [None; 7]),
        ];
        for (change, expected) in cases {
            for (from, want) in ALL_STATUSES.iter().zip(expected) {
                assert_eq!(next(*from, change), *want, "{change:?} from {from:?}");
            }
        }
    }

    #[test]
    fn nothing_moves_a_row_back_to_connecting() {
        for from in ALL_STATUSES {
            for change in every_change() {
                if let Some(to) = next(from, &change) {
                    assert!(
                        to != Status::Connecting || from == Status::Connecting,
                        "{change:?} moved {from:?} back to connecting"
                    );
                }
            }
        }
    }

    #[test]
    fn deleted_and_lost_rows_are_final_for_deliveries() {
        for change in every_change() {
            assert_eq!(next(Status::Deleted, &change), None, "{change:?}");
            assert_eq!(next(Status::Lost, &change), None, "{change:?}");
        }
    }

    #[test]
    fn every_delivery_is_idempotent() {
        // Applying a delivery twice ends where applying it once does.
        for from in ALL_STATUSES {
            for change in every_change() {
                if let Some(once) = next(from, &change) {
                    let twice = next(once, &change).unwrap_or(once);
                    assert_eq!(once, twice, "{change:?} from {from:?}");
                }
            }
        }
    }

    #[test]
    fn final_closes() {
        assert!(
            is_final_close(Some(401)) && is_final_close(Some(402)) && is_final_close(Some(406))
        );
        assert!(!is_final_close(Some(408)) && !is_final_close(Some(428)) && !is_final_close(None));
        assert!(close_reason(Some(401)).contains("unlinked"));
    }
}
