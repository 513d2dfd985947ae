//! The errors evoq raises to SQL: one enum, each variant with its SQLSTATE and a hint that says
//! what to do. Messages never carry the API key.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug)]
pub enum EvoqError {
    /// A bad argument to a public function.
    InvalidArgument {
        message: String,
        hint: Option<String>,
    },
    /// evoq_configure has not been called.
    NotConfigured,
    /// Something evoq needs is not installed (pg_cron).
    MissingDependency { message: String, hint: String },
    /// evoq_attach pointed at something unusable.
    BadTarget { message: String, hint: String },
    /// The database is not in a state where the call can work: a restored copy that was not told
    /// it is a copy, an attachment whose user id column changed, the wrong database for pg_cron.
    NotReady { message: String, hint: String },
    /// The calling role lacks a privilege the call needs on the caller's own behalf.
    PermissionDenied { message: String, hint: String },
    /// evoq's own SQL failed where it cannot (a statement of the extension's, not the user's):
    /// a broken or half-upgraded installation, or a bug.
    Internal { message: String },
}

impl EvoqError {
    pub fn invalid(message: impl Into<String>, hint: impl Into<String>) -> Self {
        EvoqError::InvalidArgument {
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    fn parts(self) -> (PgSqlErrorCode, String, Option<String>) {
        match self {
            EvoqError::InvalidArgument { message, hint } => {
                (PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message, hint)
            }
            EvoqError::NotConfigured => (
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "evoq is not configured: no Evolution API URL and key are set".into(),
                Some("Run SELECT evoq_configure(api_url => 'http://your-evolution-host:8080', api_key => '...');".into()),
            ),
            EvoqError::MissingDependency { message, hint } => {
                (PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED, message, Some(hint))
            }
            EvoqError::BadTarget { message, hint } => {
                (PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message, Some(hint))
            }
            EvoqError::NotReady { message, hint } => (
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                message,
                Some(hint),
            ),
            EvoqError::PermissionDenied { message, hint } => {
                (PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, message, Some(hint))
            }
            EvoqError::Internal { message } => (
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                message,
                Some("Check that the installed evoq files match the extension version (SELECT extversion FROM pg_extension WHERE extname = 'evoq'; ALTER EXTENSION evoq UPDATE;), then report it with this message.".into()),
            ),
        }
    }

    /// evoq's own statement `what` failed with `detail`.
    pub fn internal(what: &str, detail: impl std::fmt::Display) -> Self {
        EvoqError::Internal {
            message: format!("evoq {what}: {detail}"),
        }
    }

    /// Raises this error as a Postgres ERROR (unwinds; the transaction is aborted).
    pub fn raise(self) -> ! {
        let (code, message, hint) = self.parts();
        let mut report = ErrorReport::new(code, message, "evoq");
        if let Some(hint) = hint {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

/// Unwraps a result or raises its error.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T, EvoqError> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|e| e.raise())
    }
}

/// An SPI result from one of evoq's own statements: "no row" is None, any other failure is an
/// internal error with what was being done. (0.1.0 turned such failures into silent defaults.)
pub trait SpiResult<T> {
    fn or_internal(self, what: &str) -> T;
}

impl<T: Default> SpiResult<T> for Result<T, pgrx::spi::Error> {
    fn or_internal(self, what: &str) -> T {
        match self {
            Ok(value) => value,
            Err(pgrx::spi::Error::InvalidPosition) => T::default(),
            Err(e) => EvoqError::internal(what, e).raise(),
        }
    }
}
