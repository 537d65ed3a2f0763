//! servicebusdemo: one binary, three roles (producer, consumer, scaler).
//! `main` only wires config -> telemetry -> mode and maps errors to exit codes.

mod auth;
mod config;
mod consumer;
mod producer;
mod scaler;
mod servicebus;
mod telemetry;

fn main() {}
