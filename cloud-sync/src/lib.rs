//! sluice-cloud-sync: the telemetry record, the durable SQLite outbox, and the
//! uplink that drains it to a cloud MQTT broker over TLS.
//!
//! Data flow: device listeners (in the agent) call [`Outbox::append`], which
//! returns once the records are committed; the [`Uplink`] leases committed
//! records in seq order, publishes them to `P/telemetry` at QoS 1, and acks
//! them back to the outbox (deleting them) only when the broker's PUBACK for
//! that very publish arrives.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use sluice_cloud_sync::{Clock, ClockMode, Outbox, OutboxConfig, Record, DeviceName, Value};
//! use std::{path::Path, sync::Arc};
//! let clock = Arc::new(Clock::new(ClockMode::Auto));
//! let outbox = Outbox::open(
//!     Path::new("outbox.db"),
//!     Path::new("state.db"),
//!     OutboxConfig::default(),
//!     clock,
//! )?;
//! let receipt = outbox.append(&[Record {
//!     device: DeviceName::new("dev-1"),
//!     ts_ms: 1_700_000_000_000,
//!     ts_trusted: true,
//!     values: vec![("t".into(), Value::F64(21.5))],
//! }]).await?;
//! println!("stored as seq {}", receipt.first);
//! # Ok(()) }
//! ```

pub mod certificate;
pub mod clock;
pub mod downlink;
pub mod drain;
pub mod histogram;
pub mod outbox;
pub mod profile;
pub mod record;
pub mod statedb;
pub mod tls;
pub mod uplink;

pub use clock::{Clock, ClockMode, Stamp};
pub use outbox::{
    AppendError, AppendReceipt, CheckReport, DEFAULT_STREAM, Durability, Leased, Outbox,
    OutboxConfig, OutboxError, OutboxStats, PendingAppend, StreamConfig, StreamStats, WhenFull,
};
pub use record::{DeviceName, Record, Seq, Value};
pub use uplink::{Uplink, UplinkConfig, UplinkError, UplinkStatus, UplinkTls};
