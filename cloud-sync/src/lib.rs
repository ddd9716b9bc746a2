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
//! use sluice_cloud_sync::{Outbox, OutboxConfig, WhenFull, Durability, Record, DeviceName, Value};
//! use std::{path::Path, time::Duration};
//! let outbox = Outbox::open(Path::new("outbox.db"), Path::new("state.db"), OutboxConfig {
//!     max_bytes: 256 << 20,
//!     max_age: Duration::from_secs(7 * 86400),
//!     when_full: WhenFull::DropOldest,
//!     durability: Durability::Power,
//! })?;
//! let receipt = outbox.append(&[Record {
//!     device: DeviceName::new("dev-1"),
//!     ts_ms: 1_700_000_000_000,
//!     ts_trusted: true,
//!     values: vec![("t".into(), Value::F64(21.5))],
//! }]).await?;
//! println!("stored as seq {}", receipt.first);
//! # Ok(()) }
//! ```

pub mod outbox;
pub mod profile;
pub mod record;
pub mod statedb;
pub mod uplink;

pub use outbox::{
    AppendError, AppendReceipt, Durability, Leased, Outbox, OutboxConfig, OutboxError, OutboxStats,
    WhenFull,
};
pub use record::{DeviceName, Record, Seq, Value};
pub use uplink::{Uplink, UplinkConfig, UplinkError, UplinkStatus, UplinkTls};
