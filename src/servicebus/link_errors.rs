//! Translation of fe2o3's link, session and connection errors into [`ServiceBusError`].

use fe2o3_amqp::connection::ConnectionStopReason;
use fe2o3_amqp::link::{
    DetachError, LinkStateError, ReceiverAttachError, RecvError, SendError, SenderAttachError,
    SessionStopReason,
};

use fe2o3_amqp::types::definitions::Error;

use super::ServiceBusError;

pub fn session_stopped(context: &str, reason: &SessionStopReason) -> ServiceBusError {
    match reason {
        SessionStopReason::RemoteEndedWithError(err) | SessionStopReason::EndedWithError(err) => {
            ServiceBusError::from_amqp(context, err)
        }
        SessionStopReason::ConnectionStopped(ConnectionStopReason::RemoteClosedWithError(err)) => {
            match ServiceBusError::from_amqp(context, err) {
                // Whatever the condition, a closed connection can be reopened.
                ServiceBusError::Protocol(detail) => ServiceBusError::Disconnected(detail),
                classified => classified,
            }
        }
        other => ServiceBusError::Disconnected(format!("{context}: {other:?}")),
    }
}

/// An established link detached by the broker. `unauthorized-access` there means the token
/// that authorised the link lapsed (Service Bus drops the links then) or the role was
/// revoked: reconnecting puts a new token, and a role that is really gone is refused again at
/// attach, where it is final.
fn remote_detach(context: &str, err: &Error) -> ServiceBusError {
    match ServiceBusError::from_amqp(context, err) {
        ServiceBusError::Unauthorized(detail) => ServiceBusError::Disconnected(format!(
            "{detail} (the link's authorisation lapsed or was withdrawn; reconnecting with a new token)"
        )),
        classified => classified,
    }
}

pub fn detach(context: &str, err: &DetachError) -> ServiceBusError {
    match err {
        DetachError::RemoteDetachedWithError(e) | DetachError::RemoteClosedWithError(e) => {
            remote_detach(context, e)
        }
        DetachError::SessionStopped(reason) => session_stopped(context, reason),
        other => ServiceBusError::Disconnected(format!("{context}: {other}")),
    }
}

pub fn link_state(context: &str, err: &LinkStateError) -> ServiceBusError {
    match err {
        LinkStateError::RemoteDetachedWithError(e) | LinkStateError::RemoteClosedWithError(e) => {
            remote_detach(context, e)
        }
        LinkStateError::SessionStopped(reason) => session_stopped(context, reason),
        other => ServiceBusError::Disconnected(format!("{context}: {other}")),
    }
}

pub fn sender_attach(context: &str, err: &SenderAttachError) -> ServiceBusError {
    match err {
        SenderAttachError::RemoteClosedWithError(e) => ServiceBusError::from_amqp(context, e),
        SenderAttachError::SessionStopped(reason) => session_stopped(context, reason),
        other => ServiceBusError::Disconnected(format!("{context}: {other}")),
    }
}

pub fn receiver_attach(context: &str, err: &ReceiverAttachError) -> ServiceBusError {
    match err {
        ReceiverAttachError::RemoteClosedWithError(e) => ServiceBusError::from_amqp(context, e),
        ReceiverAttachError::SessionStopped(reason) => session_stopped(context, reason),
        other => ServiceBusError::Disconnected(format!("{context}: {other}")),
    }
}

pub fn send(context: &str, err: &SendError) -> ServiceBusError {
    match err {
        SendError::LinkStateError(e) => link_state(context, e),
        SendError::Detached(e) => detach(context, e),
        SendError::MessageSizeExceeded(e) => {
            ServiceBusError::MessageTooLarge(format!("{context}: {e}"))
        }
        other => ServiceBusError::Protocol(format!("{context}: {other}")),
    }
}

pub fn recv(context: &str, err: &RecvError) -> ServiceBusError {
    match err {
        RecvError::LinkStateError(e) => link_state(context, e),
        other if other.recovery().link_is_usable() => {
            ServiceBusError::Protocol(format!("{context}: {other}"))
        }
        other => ServiceBusError::Disconnected(format!("{context}: {other}")),
    }
}
