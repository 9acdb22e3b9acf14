//! Integration tests: one binary, a real RabbitMQ, a real PostgreSQL and the in-crate mock
//! APNs over real TLS and HTTP/2. Each test gets its own queue prefix, schema and mock
//! (see `support`), so they run in parallel and leave nothing behind.

mod acks;
mod alerts;
mod apns;
mod apps;
mod architecture;
mod binary;
mod bounds;
mod brands;
mod building;
mod calls;
mod delivery;
mod demo;
mod deploy;
mod errors;
mod faults;
mod fcm;
mod gateways;
mod holding;
mod life;
mod metrics;
mod migrate;
mod mistake;
mod nodes;
mod once;
mod proxy;
mod purge;
mod readme;
mod recovery;
mod republish;
mod restarts;
mod schema_v2;
mod schema_v3;
mod seam;
mod servers;
mod services;
mod support;
mod tenants;
mod tls;
