//! ringpush: gets a doorbell ring onto every phone that should hear it.
//!
//! A gateway publishes a ring event to RabbitMQ; workers look up the owner's and sharees'
//! device tokens in PostgreSQL and push one notification per token — APNs for iPhones, FCM
//! for Android phones — over persistent HTTP/2 connections. The tree is the architecture:
//!
//! - [`backoff`]: the jittered reconnect backoff every connection uses;
//! - [`human`]: how durations read where a person reads them, and the nearest known name;
//! - [`cli`]: command-line flags and `RINGPUSH_*` variables, parsed once into the plain
//!   settings below (only the binary uses it; no module here imports it);
//! - [`wire`]: what crosses the broker — ring event v1 (parsed, never merely validated), the
//!   retry envelope, feedback events and purge requests, their times and headers;
//! - [`token`]: device tokens and the APNs environment that issued them;
//! - [`broker`]: RabbitMQ topology, connections, confirmed publishes;
//! - [`db`]: PostgreSQL pool, migrations, the batched token lookup;
//! - [`tls`]: the TLS every connection uses (rustls with ring; public roots plus an extra
//!   CA; client certificates; verification never off);
//! - [`apns`]: request building, reasons, JWT and the HTTP/2 client;
//! - [`worker`]: `ringpush worker`, the consume → lookup → push → settle loop;
//! - [`mock`]: `ringpush mock-apns`, a local APNs used by tests, the demo and benchmarks;
//! - [`local`]: a private world on the local broker and database (queue prefix, schema,
//!   key, mock settings, client), as the demo, the bench and the tests stand it up;
//! - [`demo`]: `ringpush demo`, the whole pipeline on one machine;
//! - [`feedback`], [`purge`]: the stale-token flow;
//! - [`gateway`]: `ringpush gateway`, one broker identity per gateway (and the management
//!   API client);
//! - [`service`]: `ringpush service`, one least-privilege broker identity per ringpush
//!   process role, and the topology declared for them;
//! - [`metrics`], [`ops`]: what operators see and type;
//! - [`bench`]: `ringpush bench`.
//!
//! [`mock`], [`mock_fcm`], [`local`], [`demo`] and [`bench`] are the test kit: compiled with
//! the `kit` feature (on by default), left out of the production binary
//! (`--no-default-features`) with the crates only they need.

pub mod apns;
pub mod apps;
pub mod backoff;
#[cfg(feature = "kit")]
pub mod bench;
pub mod broker;
pub mod cli;
pub mod db;
#[cfg(feature = "kit")]
pub mod demo;
pub mod fcm;
pub mod feedback;
pub mod gateway;
pub mod http;
pub mod http2;
pub mod human;
#[cfg(feature = "kit")]
pub mod local;
pub mod metrics;
#[cfg(feature = "kit")]
pub mod mock;
#[cfg(feature = "kit")]
pub mod mock_fcm;
pub mod ops;
pub mod provider;
pub mod purge;
pub mod service;
pub mod tls;
pub mod token;
pub mod wire;
pub mod worker;
