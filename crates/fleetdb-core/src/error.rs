//! Errors. One umbrella [`Error`] with variants per operating condition; each message names the
//! field, the value and the rule (or the limit), so a caller can act on it without reading code.

use crate::model::Revision;

/// The result type of every FleetDB call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in FleetDB that is not a bug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Input that breaks a rule: names the field, the value and the rule.
    #[error("invalid {field} {value:?}: {rule}")]
    Invalid {
        field: String,
        value: String,
        rule: String,
    },
    /// Input larger than a configured limit.
    #[error("{field} is {size} bytes; the maximum is {max}")]
    TooLarge {
        field: String,
        size: usize,
        max: usize,
    },
    /// Input cut off while it was read, one byte past a limit (stdin, a pipe): larger than
    /// `max`, by how much is not known. Code `too_large`, as [`Error::TooLarge`].
    #[error("{field} is more than {max} bytes; the maximum is {max}")]
    TooLargeInput { field: String, max: usize },
    /// The thing addressed does not exist.
    #[error("{what} not found")]
    NotFound { what: String },
    /// The thing to create exists already.
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    /// A namespace still holds objects and cannot be deleted.
    #[error("namespace {namespace:?} is not empty: it still holds {remaining}")]
    NamespaceNotEmpty {
        namespace: String,
        remaining: String,
    },
    /// A precondition (a value read inside a transaction) no longer holds. Transactions retry on it.
    #[error("conflict: {what} changed since it was read")]
    Conflict { what: String },
    /// The session has expired (or was closed): every later call on it fails; start a new one.
    #[error("session {session_id} has expired or was closed")]
    SessionExpired { session_id: String },
    /// The claim is no longer held by this session with this fencing token; nothing was changed.
    #[error("work lost: {what}")]
    WorkLost { what: String },
    /// A transaction kept conflicting and gave up.
    #[error("transaction gave up after {attempts} attempts: {last}")]
    RetriesExhausted { attempts: u32, last: String },
    /// The database schema is newer than this binary knows; nothing was written.
    #[error("database schema version {database} is newer than this binary supports ({binary}); upgrade fleetdb")]
    SchemaTooNew { database: u32, binary: u32 },
    /// The database schema is older than this binary and migration was not allowed.
    #[error("database schema version {database} is older than this binary's ({binary}); run `fleetdb migrate up`")]
    SchemaBehind { database: u32, binary: u32 },
    /// A revision older than the compaction point was asked for.
    #[error("revision {requested} has been compacted; the oldest available is after {compacted_revision}")]
    Compacted {
        requested: Revision,
        compacted_revision: Revision,
    },
    /// A write was refused by a rule of the data it addresses (a deploy chain rule, say); `reason`
    /// says which. Retrying the same write cannot succeed.
    #[error("{what} refused: {reason}")]
    Refused { what: String, reason: String },
    /// A watch consumer fell behind its buffer and was ended. Resume with `from_revision =
    /// last_delivered` to miss nothing.
    #[error("watch fell behind and was ended; resume after revision {last_delivered}")]
    WatchLagged { last_delivered: Revision },
    /// The operation is not supported by this backend (a declared capability difference).
    #[error("unsupported by the {backend} backend: {what}")]
    Unsupported { backend: String, what: String },
    /// The database could not be reached or answered with a transient failure after retries.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Any other database failure.
    #[error("database error: {0}")]
    Backend(String),
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(
        field: impl Into<String>,
        value: impl Into<String>,
        rule: impl Into<String>,
    ) -> Self {
        Error::Invalid {
            field: field.into(),
            value: value.into(),
            rule: rule.into(),
        }
    }

    /// Shorthand for [`Error::NotFound`].
    pub fn not_found(what: impl Into<String>) -> Self {
        Error::NotFound { what: what.into() }
    }

    /// Whether a retry of the same request could succeed (used by transaction loops and clients).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Conflict { .. } | Error::Unavailable(_))
    }

    /// Whether a later attempt of the same call, after a pause, may not get this error: a
    /// retryable one, or conflicts past the store's own retries (what a worker waits out:
    /// `Session::claim_wait`, `fleetdb worker`'s outcome writes).
    pub fn is_transient(&self) -> bool {
        self.is_retryable() || matches!(self, Error::RetriesExhausted { .. })
    }

    /// A short stable code for machines (CLI JSON output, later wire status).
    pub fn code(&self) -> &'static str {
        match self {
            Error::Invalid { .. } => "invalid",
            Error::TooLarge { .. } | Error::TooLargeInput { .. } => "too_large",
            Error::NotFound { .. } => "not_found",
            Error::AlreadyExists { .. } => "already_exists",
            Error::NamespaceNotEmpty { .. } => "namespace_not_empty",
            Error::Conflict { .. } => "conflict",
            Error::RetriesExhausted { .. } => "retries_exhausted",
            Error::SessionExpired { .. } => "session_expired",
            Error::WorkLost { .. } => "work_lost",
            Error::SchemaTooNew { .. } => "schema_too_new",
            Error::SchemaBehind { .. } => "schema_behind",
            Error::Compacted { .. } => "compacted",
            Error::Refused { .. } => "refused",
            Error::WatchLagged { .. } => "watch_lagged",
            Error::Unsupported { .. } => "unsupported",
            Error::Unavailable(_) => "unavailable",
            Error::Backend(_) => "backend",
        }
    }
}
