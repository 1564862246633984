//! The one place where driver errors become FleetDB errors.

use deadpool_postgres::PoolError;
use fleetdb_core::Error;
use tokio_postgres::error::SqlState;

/// What a driver error means to FleetDB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// A transient conflict between transactions (serialization failure, deadlock, a revision
    /// taken twice): running the whole transaction again may succeed.
    Retry(String),
    /// Anything else, already translated.
    Fail(Error),
}

/// Classify a driver error: connection problems are [`Error::Unavailable`], serialization
/// failures (40001), deadlocks (40P01) and unique violations on the change log's and the work
/// table's primary keys are [`Failure::Retry`], everything else is [`Error::Backend`].
pub(crate) fn classify(e: &tokio_postgres::Error) -> Failure {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        let mut msg = format!("{} (SQLSTATE {})", db.message(), code.code());
        if let Some(detail) = db.detail() {
            msg.push_str(": ");
            msg.push_str(detail);
        }
        if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED
        {
            return Failure::Retry(msg);
        }
        // A revision taken twice, or the same (object, process) claimed by two transactions at
        // once (reported as a unique violation rather than a serialization failure when the
        // other one committed first): running the transaction again reads what it missed.
        if *code == SqlState::UNIQUE_VIOLATION
            && matches!(db.constraint(), Some("changes_pkey" | "work_pkey"))
        {
            return Failure::Retry(msg);
        }
        let c = code.code();
        // Connection exceptions, authentication, a missing database, the server shutting down or
        // refusing connections, the server closing an idle session (57P05) or one idle in a
        // transaction (25P03), a server that is (now) a standby and refuses writes (25006: after
        // a failover, a connection to the demoted primary): the database cannot be used right
        // now; trying again (on another connection) may succeed.
        if c.starts_with("08")
            || c.starts_with("28")
            || matches!(
                c,
                "3D000" | "57P01" | "57P02" | "57P03" | "57P05" | "53300" | "25P03" | "25006"
            )
        {
            return Failure::Fail(Error::Unavailable(msg));
        }
        return Failure::Fail(Error::Backend(msg));
    }
    let text = e.to_string();
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    if e.is_closed() || io || text.starts_with("error connecting") || text.contains("timeout") {
        let full = match std::error::Error::source(e) {
            Some(s) => format!("{text}: {s}"),
            None => text,
        };
        return Failure::Fail(Error::Unavailable(full));
    }
    Failure::Fail(Error::Backend(text))
}

/// Whether the server ended the session with this error (a `FATAL` or `PANIC` report: the
/// connection terminated by an administrator or a failover tool, the server shutting down or
/// restarting after a crash). The backend exits at once, so a transaction open on the connection
/// is rolled back and nothing sent after the statement that got this answer is carried out. As
/// the answer to anything but `COMMIT`, it means the transaction kept nothing and may run again
/// on another connection; as `COMMIT`'s own answer it says nothing of the outcome (callers look
/// it up or report `Unavailable`).
pub(crate) fn session_ended(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        matches!(
            db.parsed_severity(),
            Some(tokio_postgres::error::Severity::Fatal | tokio_postgres::error::Severity::Panic)
        )
    })
}

/// Whether the connection is gone: the server ended the session ([`session_ended`]), or the
/// connection closed or failed without an answer from the server.
pub(crate) fn connection_gone(e: &tokio_postgres::Error) -> bool {
    session_ended(e)
        || (e.as_db_error().is_none()
            && matches!(classify(e), Failure::Fail(Error::Unavailable(_))))
}

/// [`Failure::Retry`] for an answer that ended the session before `COMMIT` (see
/// [`session_ended`]): the transaction kept nothing and runs again on another connection.
pub(crate) fn ended_before_commit(e: &tokio_postgres::Error) -> Option<Failure> {
    session_ended(e).then(|| retry_elsewhere(e))
}

/// [`Failure::Retry`] when the connection is gone ([`connection_gone`]) and the caller has not
/// sent `COMMIT` (nor any statement outside a transaction): nothing can have been kept, so the
/// work runs again on another connection — a pooled connection the server had closed, an
/// administrator's `pg_terminate_backend`, a failover.
pub(crate) fn gone_before_commit(e: &tokio_postgres::Error) -> Option<Failure> {
    connection_gone(e).then(|| retry_elsewhere(e))
}

fn retry_elsewhere(e: &tokio_postgres::Error) -> Failure {
    let why = match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    };
    Failure::Retry(format!(
        "the connection ended before COMMIT (nothing was kept): {why}"
    ))
}

/// A driver error outside a retried transaction: a transient conflict is reported as
/// [`Error::Unavailable`] (trying again may succeed).
pub(crate) fn db_err(e: tokio_postgres::Error) -> Error {
    match classify(&e) {
        Failure::Retry(msg) => Error::Unavailable(msg),
        Failure::Fail(err) => err,
    }
}

/// Whether a driver error is a unique violation on `constraint`.
pub(crate) fn is_unique_violation(e: &tokio_postgres::Error, constraint: &str) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::UNIQUE_VIOLATION && db.constraint() == Some(constraint)
    })
}

/// Getting a connection from the pool failed: the database is unreachable (or refused us).
pub(crate) fn pool_err(e: PoolError) -> Error {
    match e {
        PoolError::Backend(e) => match classify(&e) {
            Failure::Fail(Error::Backend(msg)) | Failure::Retry(msg) => Error::Unavailable(msg),
            Failure::Fail(err) => err,
        },
        other => Error::Unavailable(format!("connection pool: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server refusing writes (a standby, or a primary demoted by a failover: here a session
    /// made read-only) is unavailable for now, not a backend bug: callers try again.
    #[tokio::test]
    async fn a_read_only_server_is_unavailable() {
        let (client, conn) =
            tokio_postgres::connect(&crate::testing::test_url(), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute("SET default_transaction_read_only = on")
            .await
            .unwrap();
        let e = client
            .batch_execute("CREATE TABLE fleetdb_ro_probe_t (x int)")
            .await
            .unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("25006"), "{e}");
        assert!(matches!(db_err(e), Error::Unavailable(_)));
    }
}
