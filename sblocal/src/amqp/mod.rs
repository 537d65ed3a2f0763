//! The AMQP 1.0 protocol engine.
