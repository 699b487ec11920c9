//! `handover=NAME`: a connection that stays open, on which an application registered for live
//! migration of a workload hears the agent's events and answers its handovers (the protocol
//! is `meshlink_uapi::handover`'s; the registry is `control::handover`'s).

use std::time::Duration;

use meshlink_uapi::errno_response;
use meshlink_uapi::handover::AppAnswer;
use tokio::io::{AsyncBufRead, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, watch};

use super::server::{read_request, shutdown_requested, Incoming};
use crate::control::handover::{Handovers, RegisterError};

/// The request's operation.
pub const OP: &str = "handover=";

/// How long writing one event to an application may take.
const EVENT_WRITE: Duration = Duration::from_secs(5);

/// Serves one registration until the application or the agent ends it.
pub async fn serve<R: AsyncBufRead + Unpin>(
    request: &str,
    handovers: Option<&Handovers>,
    reader: &mut R,
    writer: &mut OwnedWriteHalf,
    shutdown: &mut watch::Receiver<bool>,
) {
    let (op, body) = request.split_once('\n').unwrap_or((request, ""));
    let workload = op.strip_prefix(OP).unwrap_or_default();
    let registered = match handovers {
        _ if !body.trim().is_empty() => Err((libc::EINVAL, "handover takes no arguments".into())),
        None => Err((
            libc::ENOTCONN,
            "this agent has no mesh session (it runs without a coordinator)".into(),
        )),
        Some(h) => h.register(workload).map_err(|e| {
            let errno = match e {
                RegisterError::Taken(_) => libc::EBUSY,
                RegisterError::BadName(_) => libc::EINVAL,
            };
            (errno, e.to_string())
        }),
    };
    let mut registration = match registered {
        Ok(r) => r,
        Err((errno, message)) => {
            tracing::info!("userspace API: live-migration registration refused: {message}");
            let answer = format!("message={message}\n{}", errno_response(errno));
            let _ = writer.write_all(answer.as_bytes()).await;
            return;
        }
    };
    let handovers = handovers.expect("registered with a registry");
    tracing::info!(%workload, "an application registered for live migration");
    // The application's messages are read apart (a read cut short by an event in a select
    // would lose what it had read), and come through a small queue.
    let (answers_tx, mut answers_rx) = mpsc::channel::<Incoming>(4);
    let reading = async {
        loop {
            let incoming = match read_request(reader).await {
                Ok(i) => i,
                Err(_) => Incoming::Eof,
            };
            let end = !matches!(incoming, Incoming::Request(_));
            if answers_tx.send(incoming).await.is_err() || end {
                break;
            }
        }
    };
    let serving = async {
        if writer
            .write_all(errno_response(0).as_bytes())
            .await
            .is_err()
        {
            return;
        }
        loop {
            tokio::select! {
                () = shutdown_requested(shutdown) => break,
                event = registration.events.recv() => {
                    let Some(event) = event else { break };
                    // An application that does not read its events is not waited for.
                    let text = event.render();
                    let write = writer.write_all(text.as_bytes());
                    if !matches!(tokio::time::timeout(EVENT_WRITE, write).await, Ok(Ok(()))) {
                        tracing::warn!(%workload, "the application does not take its events; closing its registration");
                        break;
                    }
                }
                incoming = answers_rx.recv() => match incoming {
                    Some(Incoming::Request(bytes)) => {
                        let text = String::from_utf8_lossy(&bytes);
                        match AppAnswer::parse(&text) {
                            Ok(AppAnswer::HandedOver { workload: w, generation, error }) if w == workload => {
                                handovers.answer(&w, generation, error.map_or(Ok(()), Err));
                            }
                            Ok(AppAnswer::HandedOver { workload: w, .. }) => {
                                tracing::warn!(%workload, "an application answered for another workload ({w}); ignored");
                            }
                            Err(e) => {
                                tracing::warn!(%workload, "a bad message from the application: {e}; closing its registration");
                                break;
                            }
                        }
                    }
                    _ => break,
                },
            }
        }
    };
    // Reading ends with the connection; serving may end first (then reading is dropped).
    tokio::select! {
        () = serving => {}
        () = async { reading.await; std::future::pending::<()>().await } => {}
    }
    handovers.unregister(workload, registration.id);
    tracing::info!(%workload, "the application's live-migration registration ended");
}
