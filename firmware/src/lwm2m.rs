//! LwM2M object 5 (Firmware Update) semantics, without I/O: the State (5/0/3)
//! and Update Result (5/0/5) resources and the transitions between states
//! that the specification allows (OMA LwM2M 1.1 core, E.6, figure "Firmware
//! Update Mechanisms" state machine). The agent feeds [`Transfer`] the events
//! of a download and an install, and reports its state and result on
//! `P/firmware/state`.
//!
//! ```text
//!            start(size)               downloaded()            updating()
//!   Idle ─────────────────► Downloading ─────────► Downloaded ──────────► Updating
//!    ▲ ▲   fail(r): result r     │  progress(b)       ▲     │ cancel()      │
//!    │ └─────────────────────────┘                    │     ▼               │
//!    │                                                └── finished(false):  │
//!    │                                                    UpdateFailed      │
//!    └──────────────── finished(true): Success ◄────────────────────────────┘
//! ```
//!
//! Choices where the specification leaves room: after a failed install the
//! next state may be Idle or Downloaded (Zephyr's client goes to Idle); here
//! it is **Downloaded** with result `UpdateFailed` (8), because the verified
//! image is still staged and the update may be executed again without a
//! second download. `fail` is allowed in Idle too, so a manifest refused
//! before any download (bad URI, unsupported protocol, no space) still
//! reports its result. `cancel` (the empty Package URI write) returns to
//! Idle with result Initial from any state but Updating.

use std::fmt;

/// Firmware Update State (resource 5/0/3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpdateState {
    /// Nothing to do (before a download, or after an update).
    Idle = 0,
    /// An image is being downloaded.
    Downloading = 1,
    /// A verified image is staged, waiting for the update to be executed.
    Downloaded = 2,
    /// The update is being installed.
    Updating = 3,
}

impl UpdateState {
    /// The numeric value of the resource.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The name used in reports: `idle`, `downloading`, `downloaded`,
    /// `updating`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Downloading => "downloading",
            Self::Downloaded => "downloaded",
            Self::Updating => "updating",
        }
    }
}

impl fmt::Display for UpdateState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Firmware Update Result (resource 5/0/5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpdateResult {
    /// Set when a download starts.
    Initial = 0,
    /// The update succeeded.
    Success = 1,
    /// Not enough flash for the image.
    NotEnoughStorage = 2,
    /// Out of RAM during the download.
    OutOfMemory = 3,
    /// The connection was lost during the download.
    ConnectionLost = 4,
    /// The image failed its integrity check (hash, size).
    IntegrityFailure = 5,
    /// The package type is not supported (an unusable manifest).
    UnsupportedPackage = 6,
    /// The URI is invalid (or names nothing).
    InvalidUri = 7,
    /// Installing the image failed.
    UpdateFailed = 8,
    /// The URI's protocol is not supported (only https is).
    UnsupportedProtocol = 9,
}

impl UpdateResult {
    /// Every result, in code order.
    pub const ALL: [Self; 10] = [
        Self::Initial,
        Self::Success,
        Self::NotEnoughStorage,
        Self::OutOfMemory,
        Self::ConnectionLost,
        Self::IntegrityFailure,
        Self::UnsupportedPackage,
        Self::InvalidUri,
        Self::UpdateFailed,
        Self::UnsupportedProtocol,
    ];

    /// The numeric value of the resource.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The name used in reports: `initial`, `success`,
    /// `not_enough_storage`, `out_of_memory`, `connection_lost`,
    /// `integrity_failure`, `unsupported_package`, `invalid_uri`,
    /// `update_failed`, `unsupported_protocol`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Initial => "initial",
            Self::Success => "success",
            Self::NotEnoughStorage => "not_enough_storage",
            Self::OutOfMemory => "out_of_memory",
            Self::ConnectionLost => "connection_lost",
            Self::IntegrityFailure => "integrity_failure",
            Self::UnsupportedPackage => "unsupported_package",
            Self::InvalidUri => "invalid_uri",
            Self::UpdateFailed => "update_failed",
            Self::UnsupportedProtocol => "unsupported_protocol",
        }
    }

    /// Whether this result reports a failed download (what [`Transfer::fail`]
    /// takes): every code but `Initial`, `Success` and `UpdateFailed` (an
    /// install's failure, reported by [`Transfer::finished`]).
    pub fn is_download_failure(self) -> bool {
        !matches!(self, Self::Initial | Self::Success | Self::UpdateFailed)
    }
}

impl fmt::Display for UpdateResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An event the state machine refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// The event is not allowed in the current state.
    #[error("firmware update event `{event}` is not allowed in state {state}")]
    NotAllowed {
        /// The event (`start`, `progress`, …).
        event: &'static str,
        /// The state it arrived in.
        state: UpdateState,
    },
    /// `fail` was given a result that is not a download failure.
    #[error("{0} is not a download failure result")]
    NotAFailure(UpdateResult),
    /// `progress` reported more bytes than the image has.
    #[error("progress of {bytes} bytes exceeds the image size of {size} bytes")]
    BeyondSize {
        /// Bytes reported.
        bytes: u64,
        /// The image size given to `start`.
        size: u64,
    },
}

/// One image's way through object 5: state, result, and how far the
/// download got. Fields are read through accessors so only the transitions
/// below can change them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    state: UpdateState,
    result: UpdateResult,
    bytes: u64,
    size: u64,
}

impl Default for Transfer {
    fn default() -> Self {
        Self::new()
    }
}

impl Transfer {
    /// Idle, result Initial, nothing downloaded.
    pub fn new() -> Self {
        Self {
            state: UpdateState::Idle,
            result: UpdateResult::Initial,
            bytes: 0,
            size: 0,
        }
    }

    /// The current state.
    pub fn state(&self) -> UpdateState {
        self.state
    }

    /// The current result.
    pub fn result(&self) -> UpdateResult {
        self.result
    }

    /// Bytes of the current (or last) image on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Size of the current (or last) image.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn expect(&self, event: &'static str, allowed: &[UpdateState]) -> Result<(), TransferError> {
        if allowed.contains(&self.state) {
            Ok(())
        } else {
            Err(TransferError::NotAllowed {
                event,
                state: self.state,
            })
        }
    }

    /// A download of `size` bytes starts: Idle → Downloading, result
    /// Initial.
    ///
    /// Fails unless Idle.
    pub fn start(&mut self, size: u64) -> Result<(), TransferError> {
        self.expect("start", &[UpdateState::Idle])?;
        *self = Self {
            state: UpdateState::Downloading,
            result: UpdateResult::Initial,
            bytes: 0,
            size,
        };
        Ok(())
    }

    /// `bytes` of the image are on disk (it may go down: a server that
    /// ignores `Range` makes the download start over).
    ///
    /// Fails unless Downloading, or when `bytes` exceeds the size.
    pub fn progress(&mut self, bytes: u64) -> Result<(), TransferError> {
        self.expect("progress", &[UpdateState::Downloading])?;
        if bytes > self.size {
            return Err(TransferError::BeyondSize {
                bytes,
                size: self.size,
            });
        }
        self.bytes = bytes;
        Ok(())
    }

    /// The image is complete and verified: Downloading → Downloaded.
    ///
    /// Fails unless Downloading.
    pub fn downloaded(&mut self) -> Result<(), TransferError> {
        self.expect("downloaded", &[UpdateState::Downloading])?;
        self.state = UpdateState::Downloaded;
        self.bytes = self.size;
        Ok(())
    }

    /// The download failed (or was refused before it started) with
    /// `result`: → Idle with that result; bytes and size stay for reports.
    ///
    /// Fails unless Idle or Downloading, or when `result` is not a download
    /// failure ([`UpdateResult::is_download_failure`]).
    pub fn fail(&mut self, result: UpdateResult) -> Result<(), TransferError> {
        self.expect("fail", &[UpdateState::Idle, UpdateState::Downloading])?;
        if !result.is_download_failure() {
            return Err(TransferError::NotAFailure(result));
        }
        self.state = UpdateState::Idle;
        self.result = result;
        Ok(())
    }

    /// The update is executed: Downloaded → Updating.
    ///
    /// Fails unless Downloaded.
    pub fn updating(&mut self) -> Result<(), TransferError> {
        self.expect("updating", &[UpdateState::Downloaded])?;
        self.state = UpdateState::Updating;
        Ok(())
    }

    /// The install ended: success → Idle with result Success; failure →
    /// Downloaded with result UpdateFailed (the image is still staged).
    ///
    /// Fails unless Updating.
    pub fn finished(&mut self, success: bool) -> Result<(), TransferError> {
        self.expect("finished", &[UpdateState::Updating])?;
        if success {
            self.state = UpdateState::Idle;
            self.result = UpdateResult::Success;
        } else {
            self.state = UpdateState::Downloaded;
            self.result = UpdateResult::UpdateFailed;
        }
        Ok(())
    }

    /// The operator withdrew the image (an empty Package URI): → Idle with
    /// result Initial.
    ///
    /// Fails while Updating (an install cannot be taken back).
    pub fn cancel(&mut self) -> Result<(), TransferError> {
        self.expect(
            "cancel",
            &[
                UpdateState::Idle,
                UpdateState::Downloading,
                UpdateState::Downloaded,
            ],
        )?;
        *self = Self::new();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_match_the_specification() {
        let states = [
            (UpdateState::Idle, 0, "idle"),
            (UpdateState::Downloading, 1, "downloading"),
            (UpdateState::Downloaded, 2, "downloaded"),
            (UpdateState::Updating, 3, "updating"),
        ];
        for (s, code, name) in states {
            assert_eq!(
                (s.code(), s.name(), s.to_string()),
                (code, name, name.to_owned())
            );
        }
        let names = [
            "initial",
            "success",
            "not_enough_storage",
            "out_of_memory",
            "connection_lost",
            "integrity_failure",
            "unsupported_package",
            "invalid_uri",
            "update_failed",
            "unsupported_protocol",
        ];
        for (i, r) in UpdateResult::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(r.code()), i);
            assert_eq!(r.name(), names[i]);
        }
    }

    #[test]
    fn a_download_and_a_successful_update_end_idle_with_success() {
        let mut t = Transfer::new();
        t.start(1000).unwrap();
        assert_eq!(
            (t.state(), t.result(), t.size()),
            (UpdateState::Downloading, UpdateResult::Initial, 1000)
        );
        t.progress(400).unwrap();
        t.progress(0).unwrap(); // the server ignored Range: start over
        t.progress(900).unwrap();
        assert_eq!(t.bytes(), 900);
        t.downloaded().unwrap();
        assert_eq!((t.state(), t.bytes()), (UpdateState::Downloaded, 1000));
        t.updating().unwrap();
        assert_eq!(t.state(), UpdateState::Updating);
        t.finished(true).unwrap();
        assert_eq!(
            (t.state(), t.result()),
            (UpdateState::Idle, UpdateResult::Success)
        );
        // A new download resets the result.
        t.start(5).unwrap();
        assert_eq!(t.result(), UpdateResult::Initial);
    }

    #[test]
    fn a_failed_update_keeps_the_image_downloaded_and_may_be_retried() {
        let mut t = Transfer::new();
        t.start(10).unwrap();
        t.downloaded().unwrap();
        t.updating().unwrap();
        t.finished(false).unwrap();
        assert_eq!(
            (t.state(), t.result()),
            (UpdateState::Downloaded, UpdateResult::UpdateFailed)
        );
        t.updating().unwrap();
        t.finished(true).unwrap();
        assert_eq!(t.result(), UpdateResult::Success);
    }

    #[test]
    fn a_failed_download_returns_to_idle_with_its_result() {
        for r in UpdateResult::ALL
            .into_iter()
            .filter(|r| r.is_download_failure())
        {
            let mut t = Transfer::new();
            t.start(10).unwrap();
            t.progress(3).unwrap();
            t.fail(r).unwrap();
            assert_eq!(
                (t.state(), t.result(), t.bytes()),
                (UpdateState::Idle, r, 3)
            );
        }
        // Refused before any download.
        let mut t = Transfer::new();
        t.fail(UpdateResult::InvalidUri).unwrap();
        assert_eq!(
            (t.state(), t.result()),
            (UpdateState::Idle, UpdateResult::InvalidUri)
        );
    }

    #[test]
    fn events_out_of_order_are_refused_and_change_nothing() {
        use UpdateState::*;
        let in_state = |s: UpdateState| {
            let mut t = Transfer::new();
            if s != Idle {
                t.start(10).unwrap();
            }
            if matches!(s, Downloaded | Updating) {
                t.downloaded().unwrap();
            }
            if s == Updating {
                t.updating().unwrap();
            }
            assert_eq!(t.state(), s);
            t
        };
        type Event = fn(&mut Transfer) -> Result<(), TransferError>;
        let events: [(&str, Event, &[UpdateState]); 7] = [
            ("start", |t| t.start(1), &[Idle]),
            ("progress", |t| t.progress(1), &[Downloading]),
            ("downloaded", |t| t.downloaded(), &[Downloading]),
            (
                "fail",
                |t| t.fail(UpdateResult::ConnectionLost),
                &[Idle, Downloading],
            ),
            ("updating", |t| t.updating(), &[Downloaded]),
            ("finished", |t| t.finished(true), &[Updating]),
            ("cancel", |t| t.cancel(), &[Idle, Downloading, Downloaded]),
        ];
        for (name, event, allowed) in events {
            for s in [Idle, Downloading, Downloaded, Updating] {
                let mut t = in_state(s);
                let before = t.clone();
                let got = event(&mut t);
                if allowed.contains(&s) {
                    assert!(got.is_ok(), "{name} in {s}: {got:?}");
                } else {
                    assert_eq!(
                        got,
                        Err(TransferError::NotAllowed {
                            event: name,
                            state: s
                        })
                    );
                    assert_eq!(t, before, "{name} in {s} changed the transfer");
                }
            }
        }
    }

    #[test]
    fn fail_takes_only_download_failures_and_progress_stays_within_the_size() {
        let mut t = Transfer::new();
        t.start(10).unwrap();
        for r in [
            UpdateResult::Initial,
            UpdateResult::Success,
            UpdateResult::UpdateFailed,
        ] {
            assert_eq!(t.fail(r), Err(TransferError::NotAFailure(r)));
        }
        assert_eq!(
            t.progress(11),
            Err(TransferError::BeyondSize {
                bytes: 11,
                size: 10
            })
        );
        assert_eq!(t.state(), UpdateState::Downloading);
        t.cancel().unwrap();
        assert_eq!(t, Transfer::new());
    }
}
