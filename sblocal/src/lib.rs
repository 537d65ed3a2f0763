//! `sblocal`: a local, in-memory Azure Service Bus that Microsoft's own clients accept.
//!
//! Layers, bottom up:
//! - [`amqp`]: the AMQP 1.0 protocol engine (framing, SASL, connection/session/link state machines);
//!   it knows nothing about queues.
//! - [`broker`]: Service Bus semantics on top of the engine: queues, peek-lock, `$cbs`, `$management`.
//! - [`auth`]: what a token grants (SAS signatures and Entra-style JWTs).
//! - [`config`]: queue definitions from the emulator's `Config.json`.
//! - [`tls`], [`entra`], [`atom`], [`http`]: certificates, the token endpoint, the management (ATOM)
//!   endpoint, and the HTTP listeners with their fault-injection routes.
//! - [`identities`], [`jwt`], [`faults`]: identities and role assignments, ES256 tokens, fault switches.
//! - [`server`]: the `serve` command: listeners, wiring, the files written for clients.

pub mod amqp;
pub mod atom;
pub mod auth;
pub mod broker;
pub mod config;
pub mod entra;
pub mod faults;
pub mod http;
pub mod identities;
pub mod jwt;
pub mod server;
pub mod tls;
