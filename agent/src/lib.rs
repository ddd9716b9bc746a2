//! sluice-agent: the gateway daemon (`sluice run`) and its CLI.
//!
//! Data flow: device listeners ([`http`]) authenticate each request against
//! the [`registry`], decode the payload ([`tbjson`]) and append the records to
//! the outbox (crate `sluice-cloud-sync`), answering only after the commit;
//! the uplink drains the outbox to the cloud. [`daemon::run`] wires it all;
//! [`admin`] serves the CLI; [`config`] loads and validates the TOML.

pub mod admin;
pub mod attributes;
pub mod bench;
pub mod campaign;
pub mod cli;
pub mod coap;
pub mod coaps;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod downlink;
pub mod fleet;
pub mod health;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod ota;
pub mod pipeline;
pub mod registry;
pub mod reload;
pub mod rules;
pub mod selfupdate;
pub mod senml;
pub mod stats;
pub mod tbjson;
pub mod throttle;
pub mod tls;
pub mod watchdog;
