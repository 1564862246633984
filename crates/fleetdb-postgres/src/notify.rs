//! Cross-process wake-ups: `NOTIFY` after commits, `LISTEN` on a dedicated connection.
//!
//! The channel is per schema (`fleetdb_changes_<schema>`), so stores in different schemas of one
//! database (the tests' isolated schemas, say) do not wake each other. A notification carries
//! nothing: it only tells watchers to read the change log again. Spurious wake-ups are harmless.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

/// The longest channel name PostgreSQL keeps (NAMEDATALEN - 1).
const CHANNEL_BYTES_MAX: usize = 63;
/// Pauses between reconnection attempts of the listener.
const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(10);
/// TCP keepalive of the listening connection, which is otherwise idle: with the interval and
/// count every connection gets (`dead_peer_detection` in lib.rs: probes every 10 s, 3 unanswered),
/// a silently dead server is noticed within about a minute rather than hours.
const LISTEN_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

type Messages = Pin<Box<dyn Stream<Item = Result<AsyncMessage, tokio_postgres::Error>> + Send>>;

/// The notification channel of `schema`: `fleetdb_changes_` and the schema name, lowercased,
/// with anything but ASCII letters, digits and `_` replaced by `_`, cut at 63 bytes. Two schemas
/// mapping to one channel only wake each other spuriously.
pub(crate) fn channel_name(schema: &str) -> String {
    let mut s = String::from("fleetdb_changes_");
    s.extend(schema.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_lowercase()
        } else {
            '_'
        }
    }));
    s.truncate(CHANNEL_BYTES_MAX);
    s
}

/// A connection listening on `channel`: its client (dropping it closes the connection) and the
/// stream of its messages, which drives it.
pub(crate) struct Listener {
    _client: Client,
    messages: Messages,
}

/// Connect with `config` and `LISTEN` on `channel` (a name from [`channel_name`]: no quoting
/// needed).
pub(crate) async fn listen(config: &Config, channel: &str) -> Result<Listener, String> {
    let mut config = config.clone();
    config.keepalives(true);
    config.keepalives_idle(LISTEN_KEEPALIVE_IDLE);
    let (client, mut conn) = config.connect(NoTls).await.map_err(|e| error_chain(&e))?;
    let mut messages: Messages =
        Box::pin(futures::stream::poll_fn(move |cx| conn.poll_message(cx)));
    {
        let sql = format!("LISTEN {channel}");
        let listening = client.batch_execute(&sql);
        futures::pin_mut!(listening);
        // The connection only makes progress while its messages are polled.
        loop {
            tokio::select! {
                r = &mut listening => {
                    r.map_err(|e| error_chain(&e))?;
                    break;
                }
                m = messages.next() => match m {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(error_chain(&e)),
                    None => return Err("the connection closed".to_string()),
                },
            }
        }
    }
    Ok(Listener {
        _client: client,
        messages,
    })
}

/// Drive `first` (or connect, if it is `None`), calling `wake` on every notification; reconnect
/// with backoff when the connection drops, calling `wake` once listening again (notifications may
/// have been missed meanwhile). Ends when every sender of `shutdown` is gone.
pub(crate) fn spawn_listener(
    config: Config,
    channel: String,
    wake: Arc<dyn Fn() + Send + Sync>,
    first: Option<Listener>,
    mut shutdown: watch::Receiver<()>,
) {
    tokio::spawn(async move {
        let mut current = first;
        let mut pause = RECONNECT_INITIAL;
        loop {
            let mut listener = match current.take() {
                Some(l) => l,
                None => {
                    let attempt = tokio::select! {
                        _ = shutdown.changed() => return,
                        r = listen(&config, &channel) => r,
                    };
                    match attempt {
                        Ok(l) => {
                            pause = RECONNECT_INITIAL;
                            wake();
                            l
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, ?pause, "LISTEN connection failed; retrying");
                            tokio::select! {
                                _ = shutdown.changed() => return,
                                _ = tokio::time::sleep(pause) => {}
                            }
                            pause = (pause * 2).min(RECONNECT_MAX);
                            continue;
                        }
                    }
                }
            };
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    m = listener.messages.next() => match m {
                        Some(Ok(AsyncMessage::Notification(_))) => wake(),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::warn!(error = %error_chain(&e), "LISTEN connection lost; reconnecting");
                            break;
                        }
                        None => {
                            tracing::warn!("LISTEN connection closed; reconnecting");
                            break;
                        }
                    },
                }
            }
            drop(listener);
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    });
}

fn error_chain(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_are_plain_identifiers() {
        assert_eq!(channel_name("public"), "fleetdb_changes_public");
        assert_eq!(channel_name("My-Schema"), "fleetdb_changes_my_schema");
        let long = channel_name(&"x".repeat(100));
        assert_eq!(long.len(), 63);
        assert!(channel_name("é").is_ascii());
    }
}
