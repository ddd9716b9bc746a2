//! A DTLS 1.2 (RFC 6347) server for pre-shared keys (RFC 4279), Sans-I/O:
//! datagrams in, datagrams out, no sockets and no clock of its own.
//!
//! Scope, on purpose narrow: the server side of a full PSK handshake with
//! `TLS_PSK_WITH_AES_128_CCM_8` (RFC 6655, the CoAP mandatory suite),
//! `TLS_PSK_WITH_AES_128_CCM` and `TLS_PSK_WITH_AES_128_GCM_SHA256`
//! (RFC 5487), chosen by *our* preference in that order; the extended
//! master secret (RFC 7627) when the client offers it; the empty
//! renegotiation_info answer (RFC 5746). No certificates, no (EC)DHE, no
//! resumption (an empty session id is answered), no renegotiation, no
//! fragmented handshake messages from the client (its messages are a
//! few hundred bytes). The cryptography is not ours: HMAC-SHA-256, SHA-256
//! and AES-GCM come from `ring`, AES-CCM from RustCrypto's `ccm`.
//!
//! The cookie exchange (HelloVerifyRequest) is stateless and belongs to
//! the session layer ([`CookieJar`]); a [`PskSession`] starts from the
//! ClientHello that carried a valid cookie. Retransmission is driven by
//! the client (RFC 6347 §4.2.4): a repeated ClientHello gets our second
//! flight again, a repeated Finished our last flight.
//!
//! An unknown identity is given a key derived from a per-process secret,
//! so that it fails exactly like a wrong key: at the client's Finished,
//! with the same `bad_record_mac` alert.

use super::engine::{DtlsError, DtlsSession};
use aes::Aes128;
use ccm::Ccm;
use ccm::aead::generic_array::GenericArray;
use ccm::aead::{AeadInPlace, KeyInit};
use ccm::consts::{U8, U12, U16};
use ring::{aead, digest, hmac};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use subtle::ConstantTimeEq;

/// Record content types.
pub(crate) const CT_CCS: u8 = 20;
pub(crate) const CT_ALERT: u8 = 21;
pub(crate) const CT_HANDSHAKE: u8 = 22;
pub(crate) const CT_APP: u8 = 23;
/// DTLS 1.2 and 1.0 on the wire.
pub(crate) const DTLS12: [u8; 2] = [0xfe, 0xfd];
pub(crate) const DTLS10: [u8; 2] = [0xfe, 0xff];
/// Handshake message types.
pub(crate) const HS_CLIENT_HELLO: u8 = 1;
pub(crate) const HS_SERVER_HELLO: u8 = 2;
pub(crate) const HS_HELLO_VERIFY: u8 = 3;
pub(crate) const HS_SERVER_HELLO_DONE: u8 = 14;
pub(crate) const HS_CLIENT_KEY_EXCHANGE: u8 = 16;
pub(crate) const HS_FINISHED: u8 = 20;
/// Extensions.
pub(crate) const EXT_EMS: u16 = 0x0017;
pub(crate) const EXT_RENEGOTIATION_INFO: u16 = 0xff01;
/// TLS_EMPTY_RENEGOTIATION_INFO_SCSV.
const SCSV_RENEGOTIATION: u16 = 0x00ff;
/// Alert descriptions.
pub(crate) const ALERT_CLOSE_NOTIFY: u8 = 0;
pub(crate) const ALERT_BAD_RECORD_MAC: u8 = 20;
const ALERT_HANDSHAKE_FAILURE: u8 = 40;
const ALERT_PROTOCOL_VERSION: u8 = 70;
/// Record and handshake header sizes; the explicit nonce of AEAD records.
pub(crate) const RECORD_HEADER: usize = 13;
pub(crate) const HS_HEADER: usize = 12;
pub(crate) const EXPLICIT_NONCE: usize = 8;
/// Largest identity and key accepted (RFC 4279 allows more; the clients we
/// know cap keys at 64 bytes).
pub const MAX_IDENTITY: usize = 128;
/// See [`MAX_IDENTITY`].
pub const MAX_PSK: usize = 64;
/// Cookie length.
pub(crate) const COOKIE_LEN: usize = 16;

/// A cipher suite we speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// TLS_PSK_WITH_AES_128_CCM_8 (0xC0A8).
    PskAes128Ccm8,
    /// TLS_PSK_WITH_AES_128_CCM (0xC0A4).
    PskAes128Ccm,
    /// TLS_PSK_WITH_AES_128_GCM_SHA256 (0x00A8).
    PskAes128GcmSha256,
}

/// Our preference, strongest-for-constrained-devices first.
pub const SERVER_PREFERENCE: [Suite; 3] = [
    Suite::PskAes128Ccm8,
    Suite::PskAes128Ccm,
    Suite::PskAes128GcmSha256,
];

impl Suite {
    /// The IANA number.
    pub fn id(self) -> u16 {
        match self {
            Suite::PskAes128Ccm8 => 0xc0a8,
            Suite::PskAes128Ccm => 0xc0a4,
            Suite::PskAes128GcmSha256 => 0x00a8,
        }
    }

    /// The IANA name.
    pub fn name(self) -> &'static str {
        match self {
            Suite::PskAes128Ccm8 => "TLS_PSK_WITH_AES_128_CCM_8",
            Suite::PskAes128Ccm => "TLS_PSK_WITH_AES_128_CCM",
            Suite::PskAes128GcmSha256 => "TLS_PSK_WITH_AES_128_GCM_SHA256",
        }
    }

    pub(crate) fn tag_len(self) -> usize {
        match self {
            Suite::PskAes128Ccm8 => 8,
            _ => 16,
        }
    }
}

/// One record of a datagram.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Content type.
    pub content_type: u8,
    /// Record version.
    pub version: [u8; 2],
    /// Epoch.
    pub epoch: u16,
    /// Sequence number (48 bits).
    pub seq: u64,
    /// The fragment.
    pub body: &'a [u8],
}

/// Splits a datagram into records.
///
/// Fails on a truncated record (the whole datagram is then dropped, as
/// RFC 6347 §4.1.2.7 allows).
pub fn records(d: &[u8]) -> Result<Vec<Record<'_>>, DtlsError> {
    let mut out = Vec::new();
    let mut rest = d;
    while !rest.is_empty() {
        if rest.len() < RECORD_HEADER {
            return Err(DtlsError::Malformed("truncated record header"));
        }
        let len = usize::from(u16::from_be_bytes([rest[11], rest[12]]));
        let end = RECORD_HEADER + len;
        if rest.len() < end {
            return Err(DtlsError::Malformed("truncated record"));
        }
        let mut seq = [0u8; 8];
        seq[2..].copy_from_slice(&rest[5..11]);
        out.push(Record {
            content_type: rest[0],
            version: [rest[1], rest[2]],
            epoch: u16::from_be_bytes([rest[3], rest[4]]),
            seq: u64::from_be_bytes(seq),
            body: &rest[RECORD_HEADER..end],
        });
        rest = &rest[end..];
    }
    Ok(out)
}

/// One handshake message (unfragmented).
#[derive(Debug, Clone, Copy)]
pub struct Handshake<'a> {
    /// Message type.
    pub msg_type: u8,
    /// message_seq.
    pub msg_seq: u16,
    /// The body.
    pub body: &'a [u8],
}

pub(crate) fn u24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

/// Splits a handshake record's fragment into messages; refuses fragments.
pub fn handshakes(fragment: &[u8]) -> Result<Vec<Handshake<'_>>, DtlsError> {
    let mut out = Vec::new();
    let mut rest = fragment;
    while !rest.is_empty() {
        if rest.len() < HS_HEADER {
            return Err(DtlsError::Malformed("truncated handshake header"));
        }
        let length = u24(&rest[1..4]);
        let frag_off = u24(&rest[6..9]);
        let frag_len = u24(&rest[9..12]);
        if frag_off != 0 || frag_len != length {
            return Err(DtlsError::Unsupported("fragmented handshake message"));
        }
        let end = HS_HEADER + frag_len;
        if rest.len() < end {
            return Err(DtlsError::Malformed("truncated handshake message"));
        }
        out.push(Handshake {
            msg_type: rest[0],
            msg_seq: u16::from_be_bytes([rest[4], rest[5]]),
            body: &rest[HS_HEADER..end],
        });
        rest = &rest[end..];
    }
    Ok(out)
}

/// The parts of a ClientHello we use.
#[derive(Debug, Clone)]
pub struct ClientHello<'a> {
    /// client_version.
    pub version: [u8; 2],
    /// The client's random.
    pub random: [u8; 32],
    /// Cookie (empty in the first hello).
    pub cookie: &'a [u8],
    /// Offered suites, in the client's order.
    pub suites: Vec<u16>,
    /// Offers the extended master secret.
    pub ems: bool,
    /// Sent renegotiation_info or the SCSV.
    pub secure_renegotiation: bool,
}

pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DtlsError> {
        if self.0.len() < n {
            return Err(DtlsError::Malformed("truncated ClientHello"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DtlsError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, DtlsError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub(crate) fn vec8(&mut self) -> Result<&'a [u8], DtlsError> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }
    pub(crate) fn vec16(&mut self) -> Result<&'a [u8], DtlsError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

/// Parses a ClientHello body.
pub fn parse_client_hello(body: &[u8]) -> Result<ClientHello<'_>, DtlsError> {
    let mut r = Reader(body);
    let v = r.take(2)?;
    let version = [v[0], v[1]];
    let mut random = [0u8; 32];
    random.copy_from_slice(r.take(32)?);
    let session_id = r.vec8()?;
    if session_id.len() > 32 {
        return Err(DtlsError::Malformed("session id longer than 32 bytes"));
    }
    let cookie = r.vec8()?;
    let suite_bytes = r.vec16()?;
    if suite_bytes.len() % 2 != 0 {
        return Err(DtlsError::Malformed("odd cipher suite list"));
    }
    let suites: Vec<u16> = suite_bytes
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    let compression = r.vec8()?;
    if !compression.contains(&0) {
        return Err(DtlsError::Malformed("no null compression"));
    }
    let mut ems = false;
    let mut secure_renegotiation = suites.contains(&SCSV_RENEGOTIATION);
    if !r.0.is_empty() {
        let mut ext = Reader(r.vec16()?);
        while !ext.0.is_empty() {
            let typ = ext.u16()?;
            let data = ext.vec16()?;
            match typ {
                EXT_EMS => ems = true,
                EXT_RENEGOTIATION_INFO => {
                    // An initial handshake carries an empty renegotiated_connection.
                    if data != [0] {
                        return Err(DtlsError::Malformed("renegotiation_info not empty"));
                    }
                    secure_renegotiation = true;
                }
                _ => {}
            }
        }
    }
    Ok(ClientHello {
        version,
        random,
        cookie,
        suites,
        ems,
        secure_renegotiation,
    })
}

/// A datagram's leading ClientHello: the record, the message and its
/// parsed body. `None` when the datagram does not start with an epoch-0
/// handshake record holding a ClientHello.
pub struct HelloPeek<'a> {
    /// The record's sequence number.
    pub record_seq: u64,
    /// The message's message_seq.
    pub msg_seq: u16,
    /// The hello.
    pub hello: ClientHello<'a>,
}

/// Looks for a ClientHello at the start of `d` (cheap: the session
/// layer's prefilter). `Some(Err)` for a hello that does not parse.
pub fn peek_client_hello(d: &[u8]) -> Option<Result<HelloPeek<'_>, DtlsError>> {
    // Type 22, epoch 0, handshake type 1 (the notes' prefilter).
    if d.len() < RECORD_HEADER + HS_HEADER || d[0] != CT_HANDSHAKE || d[3..5] != [0, 0] {
        return None;
    }
    if d[RECORD_HEADER] != HS_CLIENT_HELLO {
        return None;
    }
    let recs = match records(d) {
        Ok(r) => r,
        Err(e) => return Some(Err(e)),
    };
    let rec = recs.first()?;
    let msgs = match handshakes(rec.body) {
        Ok(m) => m,
        Err(e) => return Some(Err(e)),
    };
    let msg = msgs.first()?;
    Some(parse_client_hello(msg.body).map(|hello| HelloPeek {
        record_seq: rec.seq,
        msg_seq: msg.msg_seq,
        hello,
    }))
}

/// Stateless cookies (RFC 6347 §4.2.1): HMAC-SHA-256 over the peer
/// address and the client's random under a key that changes every
/// `period`; the current and the previous key are accepted.
pub struct CookieJar {
    master: hmac::Key,
    start: Instant,
    period_s: u64,
}

impl CookieJar {
    /// A jar with a random master key.
    ///
    /// Fails when the OS has no randomness.
    pub fn new(now: Instant, period_s: u64) -> Result<Self, DtlsError> {
        Ok(Self {
            master: random_hmac_key()?,
            start: now,
            period_s: period_s.max(1),
        })
    }

    fn make(&self, bucket: u64, peer: SocketAddr, random: &[u8; 32]) -> [u8; COOKIE_LEN] {
        let mut ctx = hmac::Context::with_key(&self.master);
        ctx.update(&bucket.to_be_bytes());
        match peer.ip() {
            std::net::IpAddr::V4(ip) => ctx.update(&ip.to_ipv6_mapped().octets()),
            std::net::IpAddr::V6(ip) => ctx.update(&ip.octets()),
        }
        ctx.update(&peer.port().to_be_bytes());
        ctx.update(random);
        let tag = ctx.sign();
        let mut out = [0u8; COOKIE_LEN];
        out.copy_from_slice(&tag.as_ref()[..COOKIE_LEN]);
        out
    }

    fn bucket(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_secs() / self.period_s
    }

    /// The cookie for `peer`'s hello now.
    pub fn cookie(&self, now: Instant, peer: SocketAddr, hello: &ClientHello<'_>) -> [u8; 16] {
        self.make(self.bucket(now), peer, &hello.random)
    }

    /// Whether `hello` carries a cookie we gave `peer` in this period or
    /// the previous one.
    pub fn verify(&self, now: Instant, peer: SocketAddr, hello: &ClientHello<'_>) -> bool {
        if hello.cookie.len() != COOKIE_LEN {
            return false;
        }
        let b = self.bucket(now);
        let cur = self.make(b, peer, &hello.random);
        let mut ok = cur.ct_eq(hello.cookie);
        if b > 0 {
            ok |= self.make(b - 1, peer, &hello.random).ct_eq(hello.cookie);
        }
        ok.into()
    }

    /// A HelloVerifyRequest answering a hello in record `record_seq` with
    /// message_seq `msg_seq` (both echoed, as RFC 6347 §4.2.1 asks).
    pub fn hello_verify_request(
        &self,
        now: Instant,
        peer: SocketAddr,
        peek: &HelloPeek<'_>,
    ) -> Vec<u8> {
        let cookie = self.cookie(now, peer, &peek.hello);
        let mut body = Vec::with_capacity(3 + COOKIE_LEN);
        body.extend_from_slice(&DTLS10);
        body.push(COOKIE_LEN as u8);
        body.extend_from_slice(&cookie);
        let msg = handshake_msg(HS_HELLO_VERIFY, peek.msg_seq, &body);
        record_bytes(CT_HANDSHAKE, DTLS10, 0, peek.record_seq, &msg)
    }
}

/// A fresh random HMAC-SHA-256 key (cookies, keys for unknown identities).
fn random_hmac_key() -> Result<hmac::Key, DtlsError> {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).map_err(|_| DtlsError::Random)?;
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &k))
}

pub(crate) fn handshake_msg(msg_type: u8, msg_seq: u16, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).unwrap_or(0).to_be_bytes();
    let mut m = Vec::with_capacity(HS_HEADER + body.len());
    m.push(msg_type);
    m.extend_from_slice(&len[1..]);
    m.extend_from_slice(&msg_seq.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0]);
    m.extend_from_slice(&len[1..]);
    m.extend_from_slice(body);
    m
}

fn record_header(ct: u8, version: [u8; 2], epoch: u16, seq: u64, len: usize) -> [u8; 13] {
    let mut h = [0u8; RECORD_HEADER];
    h[0] = ct;
    h[1..3].copy_from_slice(&version);
    h[3..5].copy_from_slice(&epoch.to_be_bytes());
    h[5..11].copy_from_slice(&seq.to_be_bytes()[2..]);
    h[11..13].copy_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
    h
}

pub(crate) fn record_bytes(ct: u8, version: [u8; 2], epoch: u16, seq: u64, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD_HEADER + body.len());
    r.extend_from_slice(&record_header(ct, version, epoch, seq, body.len()));
    r.extend_from_slice(body);
    r
}

/// TLS 1.2 PRF with HMAC-SHA-256 (RFC 5246 §5).
pub fn prf(secret: &[u8], label: &[u8], seed: &[&[u8]], out: &mut [u8]) {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut label_seed = Vec::with_capacity(label.len() + 64);
    label_seed.extend_from_slice(label);
    for s in seed {
        label_seed.extend_from_slice(s);
    }
    let mut a = hmac::sign(&key, &label_seed);
    let mut filled = 0;
    while filled < out.len() {
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(a.as_ref());
        ctx.update(&label_seed);
        let block = ctx.sign();
        let n = (out.len() - filled).min(block.as_ref().len());
        out[filled..filled + n].copy_from_slice(&block.as_ref()[..n]);
        filled += n;
        a = hmac::sign(&key, a.as_ref());
    }
}

enum Cipher {
    Ccm8(Box<Ccm<Aes128, U8, U12>>),
    Ccm16(Box<Ccm<Aes128, U16, U12>>),
    Gcm(Box<aead::LessSafeKey>),
}

/// One direction's record protection.
pub(crate) struct Protection {
    cipher: Cipher,
    salt: [u8; 4],
    tag_len: usize,
}

impl Protection {
    pub(crate) fn new(suite: Suite, key: &[u8], salt: &[u8]) -> Result<Self, DtlsError> {
        let cipher = match suite {
            Suite::PskAes128Ccm8 => Cipher::Ccm8(Box::new(
                Ccm::new_from_slice(key).map_err(|_| DtlsError::Internal("CCM key"))?,
            )),
            Suite::PskAes128Ccm => Cipher::Ccm16(Box::new(
                Ccm::new_from_slice(key).map_err(|_| DtlsError::Internal("CCM key"))?,
            )),
            Suite::PskAes128GcmSha256 => Cipher::Gcm(Box::new(aead::LessSafeKey::new(
                aead::UnboundKey::new(&aead::AES_128_GCM, key)
                    .map_err(|_| DtlsError::Internal("GCM key"))?,
            ))),
        };
        let mut s = [0u8; 4];
        s.copy_from_slice(salt);
        Ok(Self {
            cipher,
            salt: s,
            tag_len: suite.tag_len(),
        })
    }

    fn nonce(&self, explicit: &[u8]) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.salt);
        n[4..].copy_from_slice(explicit);
        n
    }

    fn aad(ct: u8, version: [u8; 2], epoch: u16, seq: u64, len: usize) -> [u8; 13] {
        let mut a = [0u8; 13];
        a[..2].copy_from_slice(&epoch.to_be_bytes());
        a[2..8].copy_from_slice(&seq.to_be_bytes()[2..]);
        a[8] = ct;
        a[9..11].copy_from_slice(&version);
        a[11..13].copy_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
        a
    }

    /// A protected record of `plaintext`.
    pub(crate) fn seal(
        &self,
        ct: u8,
        epoch: u16,
        seq: u64,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, DtlsError> {
        let mut explicit = [0u8; EXPLICIT_NONCE];
        explicit[..2].copy_from_slice(&epoch.to_be_bytes());
        explicit[2..].copy_from_slice(&seq.to_be_bytes()[2..]);
        let nonce = self.nonce(&explicit);
        let aad = Self::aad(ct, DTLS12, epoch, seq, plaintext.len());
        let mut buf = plaintext.to_vec();
        let tag: Vec<u8> = match &self.cipher {
            Cipher::Ccm8(c) => c
                .encrypt_in_place_detached(GenericArray::from_slice(&nonce), &aad, &mut buf)
                .map_err(|_| DtlsError::Internal("CCM seal"))?
                .to_vec(),
            Cipher::Ccm16(c) => c
                .encrypt_in_place_detached(GenericArray::from_slice(&nonce), &aad, &mut buf)
                .map_err(|_| DtlsError::Internal("CCM seal"))?
                .to_vec(),
            Cipher::Gcm(k) => k
                .seal_in_place_separate_tag(
                    aead::Nonce::assume_unique_for_key(nonce),
                    aead::Aad::from(aad),
                    &mut buf,
                )
                .map_err(|_| DtlsError::Internal("GCM seal"))?
                .as_ref()
                .to_vec(),
        };
        let len = EXPLICIT_NONCE + buf.len() + tag.len();
        let mut out = Vec::with_capacity(RECORD_HEADER + len);
        out.extend_from_slice(&record_header(ct, DTLS12, epoch, seq, len));
        out.extend_from_slice(&explicit);
        out.extend_from_slice(&buf);
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// The plaintext of a protected record; `None` when it does not
    /// authenticate.
    pub(crate) fn open(&self, rec: &Record<'_>) -> Option<Vec<u8>> {
        if rec.body.len() < EXPLICIT_NONCE + self.tag_len {
            return None;
        }
        let (explicit, rest) = rec.body.split_at(EXPLICIT_NONCE);
        let (ciphertext, tag) = rest.split_at(rest.len() - self.tag_len);
        let nonce = self.nonce(explicit);
        let aad = Self::aad(
            rec.content_type,
            rec.version,
            rec.epoch,
            rec.seq,
            ciphertext.len(),
        );
        let mut buf = ciphertext.to_vec();
        match &self.cipher {
            Cipher::Ccm8(c) => c
                .decrypt_in_place_detached(
                    GenericArray::from_slice(&nonce),
                    &aad,
                    &mut buf,
                    GenericArray::from_slice(tag),
                )
                .ok()?,
            Cipher::Ccm16(c) => c
                .decrypt_in_place_detached(
                    GenericArray::from_slice(&nonce),
                    &aad,
                    &mut buf,
                    GenericArray::from_slice(tag),
                )
                .ok()?,
            Cipher::Gcm(k) => {
                buf.extend_from_slice(tag);
                let n = k
                    .open_in_place(
                        aead::Nonce::assume_unique_for_key(nonce),
                        aead::Aad::from(aad),
                        &mut buf,
                    )
                    .ok()?
                    .len();
                buf.truncate(n);
            }
        }
        Some(buf)
    }
}

/// The anti-replay window of RFC 6347 §4.1.2.6 (64 records).
#[derive(Default)]
pub(crate) struct ReplayWindow {
    top: u64,
    bits: u64,
    any: bool,
}

impl ReplayWindow {
    pub(crate) fn fresh(&self, seq: u64) -> bool {
        if !self.any || seq > self.top {
            return true;
        }
        let back = self.top - seq;
        back < 64 && self.bits & (1u64 << back) == 0
    }

    pub(crate) fn mark(&mut self, seq: u64) {
        if !self.any {
            self.any = true;
            self.top = seq;
            self.bits = 1;
        } else if seq > self.top {
            let shift = seq - self.top;
            self.bits = if shift >= 64 { 0 } else { self.bits << shift };
            self.bits |= 1;
            self.top = seq;
        } else {
            let back = self.top - seq;
            if back < 64 {
                self.bits |= 1u64 << back;
            }
        }
    }
}

/// Looks up a PSK by identity (an in-memory snapshot; called inside the
/// handshake, so it must not block).
pub type PskLookup = Arc<dyn Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync>;

/// What every session of one listener shares.
pub struct PskServer {
    lookup: PskLookup,
    /// Keys for unknown identities are derived from this.
    dummy: hmac::Key,
    mtu: usize,
}

impl PskServer {
    /// A server looking keys up with `lookup`, writing datagrams of at
    /// most `mtu` bytes.
    ///
    /// Fails when the OS has no randomness.
    pub fn new(lookup: PskLookup, mtu: usize) -> Result<Self, DtlsError> {
        Ok(Self {
            lookup,
            dummy: random_hmac_key()?,
            mtu,
        })
    }

    /// The key for `identity`: the registered one, or (unknown identity)
    /// one derived from a secret so that the handshake fails as with a
    /// wrong key.
    fn key_for(&self, identity: &[u8]) -> Vec<u8> {
        match (self.lookup)(identity) {
            Some(k) if !k.is_empty() && k.len() <= MAX_PSK => k,
            _ => hmac::sign(&self.dummy, identity).as_ref()[..16].to_vec(),
        }
    }
}

enum State {
    /// Our ServerHello flight is out; waiting for ClientKeyExchange.
    AwaitKeyExchange,
    /// Keys derived; waiting for the client's Finished.
    AwaitFinished,
    Established,
    Closed,
}

/// One server session of a [`PskServer`].
pub struct PskSession {
    server: Arc<PskServer>,
    state: State,
    suite: Suite,
    client_random: [u8; 32],
    server_random: [u8; 32],
    ems: bool,
    /// Handshake messages so far, as RFC 6347 §4.2.6 hashes them.
    transcript: Vec<u8>,
    master: [u8; 48],
    /// message_seq of the hello that started us.
    hello_seq: u16,
    /// The next message_seq we expect from the client.
    expect_seq: u16,
    /// Our next record sequence numbers in epochs 0 and 1.
    seq0: u64,
    seq1: u64,
    /// Our second flight (ServerHello, ServerHelloDone), for retransmission.
    flight4: Vec<u8>,
    /// Our Finished message (plaintext), to send again.
    finished: Vec<u8>,
    identity: Vec<u8>,
    psk_digest: [u8; 32],
    read: Option<Protection>,
    write: Option<Protection>,
    replay: ReplayWindow,
    tx: VecDeque<Vec<u8>>,
    /// Records dropped since [`DtlsSession::take_dropped`].
    dropped: u64,
}

impl PskServer {
    /// Starts a session from a datagram whose first record is a ClientHello
    /// the session layer found a valid cookie in; queues our second flight.
    ///
    /// Fails when the hello is unusable (no common suite, wrong version).
    pub fn accept(self: &Arc<Self>, first: &[u8]) -> Result<PskSession, DtlsError> {
        let recs = records(first)?;
        let rec = recs.first().ok_or(DtlsError::Malformed("empty datagram"))?;
        if rec.content_type != CT_HANDSHAKE || rec.epoch != 0 {
            return Err(DtlsError::Malformed("not a ClientHello"));
        }
        let msgs = handshakes(rec.body)?;
        let msg = msgs.first().ok_or(DtlsError::Malformed("empty record"))?;
        if msg.msg_type != HS_CLIENT_HELLO {
            return Err(DtlsError::Malformed("not a ClientHello"));
        }
        let hello = parse_client_hello(msg.body)?;
        let mut session = PskSession {
            server: self.clone(),
            state: State::Closed,
            suite: Suite::PskAes128Ccm8,
            client_random: hello.random,
            server_random: [0; 32],
            ems: hello.ems,
            transcript: Vec::with_capacity(512),
            master: [0; 48],
            hello_seq: msg.msg_seq,
            expect_seq: msg.msg_seq.wrapping_add(1),
            seq0: rec.seq,
            seq1: 0,
            flight4: Vec::new(),
            finished: Vec::new(),
            identity: Vec::new(),
            psk_digest: [0; 32],
            read: None,
            write: None,
            replay: ReplayWindow::default(),
            tx: VecDeque::new(),
            dropped: 0,
        };
        // DTLS versions count down: 1.2 is 0xfefd, 1.0 0xfeff.
        if u16::from_be_bytes(hello.version) > u16::from_be_bytes(DTLS12) {
            session.plain_alert(ALERT_PROTOCOL_VERSION);
            return Err(DtlsError::Unsupported("client offers no DTLS 1.2"));
        }
        let Some(suite) = SERVER_PREFERENCE
            .iter()
            .copied()
            .find(|s| hello.suites.contains(&s.id()))
        else {
            session.plain_alert(ALERT_HANDSHAKE_FAILURE);
            return Err(DtlsError::NoCommonSuite);
        };
        session.suite = suite;
        getrandom::fill(&mut session.server_random).map_err(|_| DtlsError::Random)?;
        session.transcript.extend_from_slice(&handshake_msg(
            HS_CLIENT_HELLO,
            msg.msg_seq,
            msg.body,
        ));

        let mut exts = Vec::new();
        if hello.secure_renegotiation {
            exts.extend_from_slice(&EXT_RENEGOTIATION_INFO.to_be_bytes());
            exts.extend_from_slice(&[0, 1, 0]);
        }
        if session.ems {
            exts.extend_from_slice(&EXT_EMS.to_be_bytes());
            exts.extend_from_slice(&[0, 0]);
        }
        let mut sh = Vec::with_capacity(48 + exts.len());
        sh.extend_from_slice(&DTLS12);
        sh.extend_from_slice(&session.server_random);
        sh.push(0); // no session id: no resumption
        sh.extend_from_slice(&suite.id().to_be_bytes());
        sh.push(0);
        if !exts.is_empty() {
            sh.extend_from_slice(&u16::try_from(exts.len()).unwrap_or(0).to_be_bytes());
            sh.extend_from_slice(&exts);
        }
        // Our message_seq continues after the HelloVerifyRequest's.
        let sh_msg = handshake_msg(HS_SERVER_HELLO, msg.msg_seq, &sh);
        let done_msg = handshake_msg(HS_SERVER_HELLO_DONE, msg.msg_seq.wrapping_add(1), &[]);
        session.transcript.extend_from_slice(&sh_msg);
        session.transcript.extend_from_slice(&done_msg);
        let mut body = sh_msg;
        body.extend_from_slice(&done_msg);
        let seq = session.next_seq0();
        session.flight4 = record_bytes(CT_HANDSHAKE, DTLS12, 0, seq, &body);
        session.tx.push_back(session.flight4.clone());
        session.state = State::AwaitKeyExchange;
        Ok(session)
    }
}

impl PskSession {
    fn next_seq0(&mut self) -> u64 {
        let s = self.seq0;
        self.seq0 += 1;
        s
    }

    fn next_seq1(&mut self) -> u64 {
        let s = self.seq1;
        self.seq1 += 1;
        s
    }

    /// Queues a fatal alert in clear (epoch 0).
    fn plain_alert(&mut self, desc: u8) {
        let seq = self.next_seq0();
        self.tx
            .push_back(record_bytes(CT_ALERT, DTLS12, 0, seq, &[2, desc]));
    }

    fn fail(&mut self, e: DtlsError) -> Result<(), DtlsError> {
        self.state = State::Closed;
        Err(e)
    }

    fn key_exchange(&mut self, msg: &Handshake<'_>) -> Result<(), DtlsError> {
        let mut r = Reader(msg.body);
        let identity = r
            .vec16()
            .map_err(|_| DtlsError::Malformed("truncated ClientKeyExchange"))?;
        if identity.is_empty() || identity.len() > MAX_IDENTITY || !r.0.is_empty() {
            return Err(DtlsError::Malformed("bad PSK identity"));
        }
        let psk = self.server.key_for(identity);
        self.psk_digest
            .copy_from_slice(digest::digest(&digest::SHA256, &psk).as_ref());
        self.identity = identity.to_vec();
        self.transcript.extend_from_slice(&handshake_msg(
            HS_CLIENT_KEY_EXCHANGE,
            msg.msg_seq,
            msg.body,
        ));
        // RFC 4279 §2: premaster = N, N zero bytes, N, psk.
        let n = u16::try_from(psk.len()).unwrap_or(0).to_be_bytes();
        let mut pms = Vec::with_capacity(4 + 2 * psk.len());
        pms.extend_from_slice(&n);
        pms.resize(2 + psk.len(), 0);
        pms.extend_from_slice(&n);
        pms.extend_from_slice(&psk);
        if self.ems {
            let hash = digest::digest(&digest::SHA256, &self.transcript);
            prf(
                &pms,
                b"extended master secret",
                &[hash.as_ref()],
                &mut self.master,
            );
        } else {
            prf(
                &pms,
                b"master secret",
                &[&self.client_random, &self.server_random],
                &mut self.master,
            );
        }
        let mut kb = [0u8; 40];
        prf(
            &self.master,
            b"key expansion",
            &[&self.server_random, &self.client_random],
            &mut kb,
        );
        self.read = Some(Protection::new(self.suite, &kb[0..16], &kb[32..36])?);
        self.write = Some(Protection::new(self.suite, &kb[16..32], &kb[36..40])?);
        self.expect_seq = msg.msg_seq.wrapping_add(1);
        self.state = State::AwaitFinished;
        Ok(())
    }

    fn client_finished(&mut self, msg: &Handshake<'_>) -> Result<(), DtlsError> {
        let hash = digest::digest(&digest::SHA256, &self.transcript);
        let mut expected = [0u8; 12];
        prf(
            &self.master,
            b"client finished",
            &[hash.as_ref()],
            &mut expected,
        );
        if msg.body.len() != 12 || !bool::from(expected.ct_eq(msg.body)) {
            self.plain_alert(ALERT_BAD_RECORD_MAC);
            return self.fail(DtlsError::AuthFailed);
        }
        self.transcript
            .extend_from_slice(&handshake_msg(HS_FINISHED, msg.msg_seq, msg.body));
        let hash = digest::digest(&digest::SHA256, &self.transcript);
        let mut verify = [0u8; 12];
        prf(
            &self.master,
            b"server finished",
            &[hash.as_ref()],
            &mut verify,
        );
        // Our message_seq: ServerHello, ServerHelloDone, then this.
        self.finished = handshake_msg(HS_FINISHED, self.hello_seq.wrapping_add(2), &verify);
        self.transcript = Vec::new();
        self.flight4 = Vec::new();
        self.state = State::Established;
        self.send_last_flight()
    }

    /// ChangeCipherSpec + Finished, with fresh record numbers.
    fn send_last_flight(&mut self) -> Result<(), DtlsError> {
        let seq = self.next_seq0();
        let mut d = record_bytes(CT_CCS, DTLS12, 0, seq, &[1]);
        let seq = self.next_seq1();
        let finished = self.finished.clone();
        let w = self.write.as_ref().ok_or(DtlsError::Internal("no keys"))?;
        d.extend_from_slice(&w.seal(CT_HANDSHAKE, 1, seq, &finished)?);
        self.tx.push_back(d);
        Ok(())
    }

    fn epoch0(&mut self, rec: &Record<'_>) -> Result<(), DtlsError> {
        match rec.content_type {
            CT_HANDSHAKE => {
                let Ok(msgs) = handshakes(rec.body) else {
                    self.dropped += 1;
                    return Ok(());
                };
                for msg in msgs {
                    match (&self.state, msg.msg_type) {
                        (State::AwaitKeyExchange, HS_CLIENT_HELLO)
                            if msg.msg_seq == self.hello_seq =>
                        {
                            // Our flight got lost: send it again.
                            self.tx.push_back(self.flight4.clone());
                        }
                        (State::AwaitKeyExchange, HS_CLIENT_KEY_EXCHANGE)
                            if msg.msg_seq == self.expect_seq =>
                        {
                            if let Err(e) = self.key_exchange(&msg) {
                                return self.fail(e);
                            }
                        }
                        // Repeats of what we have already processed.
                        _ => {}
                    }
                }
                Ok(())
            }
            // The switch to epoch 1 is implied by the epoch of the next records.
            CT_CCS => Ok(()),
            CT_ALERT => {
                // In clear: only honoured before the keys exist (an
                // off-path sender could forge it afterwards).
                if matches!(self.state, State::AwaitKeyExchange) && rec.body.first() == Some(&2) {
                    return self.fail(DtlsError::PeerAlert(rec.body.get(1).copied().unwrap_or(0)));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn epoch1(&mut self, rec: &Record<'_>, app: &mut Vec<Vec<u8>>) -> Result<(), DtlsError> {
        let Some(read) = &self.read else {
            self.dropped += 1;
            return Ok(()); // keys not there yet: a reordered record, dropped
        };
        if !self.replay.fresh(rec.seq) {
            self.dropped += 1;
            return Ok(());
        }
        let Some(plain) = read.open(rec) else {
            if matches!(self.state, State::AwaitFinished) && rec.content_type == CT_HANDSHAKE {
                // The client's Finished does not authenticate: another key.
                self.plain_alert(ALERT_BAD_RECORD_MAC);
                return self.fail(DtlsError::AuthFailed);
            }
            self.dropped += 1;
            return Ok(()); // RFC 6347 §4.1.2.7: drop silently
        };
        self.replay.mark(rec.seq);
        match rec.content_type {
            CT_HANDSHAKE => {
                for msg in handshakes(&plain)? {
                    if msg.msg_type != HS_FINISHED {
                        continue;
                    }
                    match self.state {
                        State::AwaitFinished if msg.msg_seq == self.expect_seq => {
                            self.client_finished(&msg)?;
                        }
                        // Our last flight got lost: send it again.
                        State::Established if msg.msg_seq == self.expect_seq => {
                            self.send_last_flight()?;
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
            CT_APP if matches!(self.state, State::Established) => {
                app.push(plain);
                Ok(())
            }
            CT_ALERT => {
                let level = plain.first().copied().unwrap_or(2);
                let desc = plain.get(1).copied().unwrap_or(0);
                if desc == ALERT_CLOSE_NOTIFY {
                    self.close();
                    self.state = State::Closed;
                    return Err(DtlsError::PeerClosed);
                }
                if level == 2 {
                    return self.fail(DtlsError::PeerAlert(desc));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl DtlsSession for PskSession {
    fn on_datagram(&mut self, datagram: &[u8], app: &mut Vec<Vec<u8>>) -> Result<(), DtlsError> {
        if matches!(self.state, State::Closed) {
            return Err(DtlsError::Closed);
        }
        // Unauthenticated garbage (anyone can spoof the peer's address)
        // must not end the session: such datagrams and records are dropped
        // (RFC 6347 §4.1.2.7).
        let Ok(recs) = records(datagram) else {
            self.dropped += 1;
            return Ok(());
        };
        for rec in recs {
            if rec.version != DTLS12 && rec.version != DTLS10 {
                self.dropped += 1;
                continue;
            }
            match rec.epoch {
                0 => self.epoch0(&rec)?,
                1 => self.epoch1(&rec, app)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.tx.pop_front()
    }

    fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    fn write(&mut self, plaintext: &[u8]) -> Result<(), DtlsError> {
        if !matches!(self.state, State::Established) {
            return Err(DtlsError::NotEstablished);
        }
        if plaintext.len() > self.max_plaintext() {
            return Err(DtlsError::TooLarge);
        }
        let seq = self.next_seq1();
        let w = self.write.as_ref().ok_or(DtlsError::Internal("no keys"))?;
        let rec = w.seal(CT_APP, 1, seq, plaintext)?;
        self.tx.push_back(rec);
        Ok(())
    }

    fn close(&mut self) {
        if matches!(self.state, State::Established) {
            let seq = self.next_seq1();
            if let Some(w) = &self.write
                && let Ok(rec) = w.seal(CT_ALERT, 1, seq, &[1, ALERT_CLOSE_NOTIFY])
            {
                self.tx.push_back(rec);
            }
        }
        self.state = State::Closed;
    }

    fn established(&self) -> bool {
        matches!(self.state, State::Established)
    }

    fn identity(&self) -> Option<&[u8]> {
        self.established().then_some(self.identity.as_slice())
    }

    fn psk_digest(&self) -> Option<[u8; 32]> {
        self.established().then_some(self.psk_digest)
    }

    fn suite(&self) -> &'static str {
        self.suite.name()
    }

    fn max_plaintext(&self) -> usize {
        self.server
            .mtu
            .saturating_sub(RECORD_HEADER + EXPLICIT_NONCE + self.suite.tag_len())
    }

    fn same_hello(&self, hello: &ClientHello<'_>) -> bool {
        hello.random == self.client_random
    }
}

/// Record protection alone, for the criterion benchmark: protects
/// `plaintext` as application data with a fixed key under `suite`, opens
/// it again and returns the record's length. Panics only on a bug.
#[doc(hidden)]
pub fn bench_seal_open(suite: Suite, plaintext: &[u8]) -> usize {
    let key = [7u8; 16];
    let salt = [1u8; 4];
    let (Ok(w), Ok(r)) = (
        Protection::new(suite, &key, &salt),
        Protection::new(suite, &key, &salt),
    ) else {
        panic!("a 16-byte key is valid for every suite");
    };
    let Ok(sealed) = w.seal(CT_APP, 1, 1, plaintext) else {
        panic!("sealing cannot fail");
    };
    let recs = records(&sealed).unwrap_or_default();
    let Some(rec) = recs.first() else {
        panic!("we parse what we write");
    };
    assert!(r.open(rec).is_some_and(|p| p == plaintext));
    sealed.len()
}

#[cfg(test)]
mod tests;
