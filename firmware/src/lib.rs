//! sluice-firmware: firmware staging for the gateway and the devices behind
//! it — signed manifests, resumable verified downloads, the update state
//! machine, the staging store and serving chunks/blocks to devices.
//!
//! **Not built yet.** This crate holds no functionality today; the agent
//! does not stage or serve firmware, and `sluice firmware …` does not exist.
//! It is a workspace member so that the layout of DESIGN.md is in place and
//! the dependency direction (`firmware` knows nothing of `agent`) is fixed.
