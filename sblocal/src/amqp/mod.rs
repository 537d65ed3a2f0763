//! The AMQP 1.0 protocol engine: framing, SASL, and the connection/session/link state machines.
//! It knows nothing about queues; the broker plugs in through [`engine::Handler`].

pub mod codec;
pub mod engine;
pub mod frame;

pub use engine::{
    serve, AttachAccept, EngineConfig, EngineError, Handler, IncomingMessage, LinkKey,
    OutgoingMessage,
};
