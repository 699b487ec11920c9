//! `handover=NAME`: a connection that stays open, on which an application registered for live
//! migration of a workload hears the agent's events and answers its handovers (the protocol
//! is `meshlink_uapi::handover`'s; the registry is `control::handover`'s).

use meshlink_uapi::errno_response;
use meshlink_uapi::handover::AppAnswer;
use tokio::io::{AsyncBufRead, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::watch;

use super::server::{read_request, shutdown_requested, Incoming};
use crate::control::handover::{Answer, Handovers, RegisterError};

/// The request's operation.
pub const OP: &str = "handover=";

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
    if writer.write_all(errno_response(0).as_bytes()).await.is_ok() {
        loop {
            tokio::select! {
                () = shutdown_requested(shutdown) => break,
                event = registration.events.recv() => {
                    let Some(event) = event else { break };
                    if writer.write_all(event.render().as_bytes()).await.is_err() {
                        break;
                    }
                }
                incoming = read_request(reader) => match incoming {
                    Ok(Incoming::Request(bytes)) => {
                        let text = String::from_utf8_lossy(&bytes);
                        match AppAnswer::parse(&text) {
                            Ok(AppAnswer::HandedOver { workload: w, generation, error }) if w == workload => {
                                handovers.answer(Answer {
                                    workload: w,
                                    generation,
                                    result: error.map_or(Ok(()), Err),
                                });
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
                    Ok(Incoming::TooLarge | Incoming::Eof) | Err(_) => break,
                },
            }
        }
    }
    handovers.unregister(workload, registration.id);
    tracing::info!(%workload, "the application's live-migration registration ended");
}
