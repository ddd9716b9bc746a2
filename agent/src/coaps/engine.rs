//! The seam between the session layer and a DTLS implementation: one
//! server session, Sans-I/O. [`super::dtls::PskSession`] implements it; an
//! OpenSSL- or rtc-dtls-backed session would implement the same trait
//! (docs/coaps.md says why neither is the default).

use super::dtls::ClientHello;

/// Why a datagram or a session failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DtlsError {
    /// Not DTLS we can read.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// DTLS we do not speak.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// The client offers none of our cipher suites.
    #[error("no common cipher suite")]
    NoCommonSuite,
    /// The client's Finished did not verify: wrong key or unknown identity
    /// (deliberately one error).
    #[error("authentication failed")]
    AuthFailed,
    /// The peer sent a fatal alert.
    #[error("peer sent alert {0}")]
    PeerAlert(u8),
    /// The peer closed the session (close_notify).
    #[error("peer closed the session")]
    PeerClosed,
    /// The session is closed.
    #[error("session closed")]
    Closed,
    /// Application data before the handshake completed.
    #[error("handshake not complete")]
    NotEstablished,
    /// Application data larger than one record within the MTU.
    #[error("message larger than the DTLS record budget")]
    TooLarge,
    /// No randomness from the OS.
    #[error("no randomness")]
    Random,
    /// A bug or a crypto library failure.
    #[error("internal: {0}")]
    Internal(&'static str),
}

impl DtlsError {
    /// A short label for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            DtlsError::Malformed(_) => "malformed",
            DtlsError::Unsupported(_) => "unsupported",
            DtlsError::NoCommonSuite => "no_common_suite",
            DtlsError::AuthFailed => "auth_failed",
            DtlsError::PeerAlert(_) => "peer_alert",
            DtlsError::PeerClosed => "peer_closed",
            DtlsError::Closed | DtlsError::NotEstablished => "closed",
            DtlsError::TooLarge => "too_large",
            DtlsError::Random | DtlsError::Internal(_) => "internal",
        }
    }
}

/// One server-side DTLS session.
pub trait DtlsSession: Send {
    /// Processes a datagram from the peer; decrypted application data is
    /// appended to `app`. An error ends the session (what it queued, such
    /// as an alert, is still to be sent).
    fn on_datagram(&mut self, datagram: &[u8], app: &mut Vec<Vec<u8>>) -> Result<(), DtlsError>;
    /// The next datagram to send to the peer.
    fn poll_transmit(&mut self) -> Option<Vec<u8>>;
    /// Records dropped (unparseable, not authentic, replayed) since the
    /// last call; the session went on.
    fn take_dropped(&mut self) -> u64;
    /// Protects `plaintext` (one datagram's worth) for the peer.
    fn write(&mut self, plaintext: &[u8]) -> Result<(), DtlsError>;
    /// Queues close_notify (when established) and closes.
    fn close(&mut self);
    /// Whether the handshake completed.
    fn established(&self) -> bool;
    /// The authenticated PSK identity (established sessions only).
    fn identity(&self) -> Option<&[u8]>;
    /// SHA-256 of the key the session was established with (to notice a
    /// rotated key).
    fn psk_digest(&self) -> Option<[u8; 32]>;
    /// The negotiated cipher suite's name.
    fn suite(&self) -> &'static str;
    /// The largest plaintext [`DtlsSession::write`] takes.
    fn max_plaintext(&self) -> usize;
    /// Whether `hello` is (a retransmission of) the hello that started
    /// this session, rather than a new handshake from the same address.
    fn same_hello(&self, hello: &ClientHello<'_>) -> bool;
}

/// Starts server sessions.
pub trait DtlsAcceptor: Send {
    /// The sessions it makes.
    type Session: DtlsSession;
    /// A session from a datagram whose first record is a ClientHello that
    /// carried a valid cookie (checked by the session layer); the session
    /// has its answer queued.
    fn accept(&self, first: &[u8]) -> Result<Self::Session, DtlsError>;
}

impl DtlsAcceptor for std::sync::Arc<super::dtls::PskServer> {
    type Session = super::dtls::PskSession;
    fn accept(&self, first: &[u8]) -> Result<Self::Session, DtlsError> {
        super::dtls::PskServer::accept(self, first)
    }
}
