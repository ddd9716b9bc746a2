//! The client side of [`super::dtls`]'s PSK handshake, Sans-I/O, for
//! `sluice bench --protocol coaps` and the session layer's tests. Not a
//! device library: one suite list, no resumption, retransmission only when
//! the caller asks ([`PskClient::retransmit`]).

use super::dtls::{
    ALERT_CLOSE_NOTIFY, CT_ALERT, CT_APP, CT_CCS, CT_HANDSHAKE, DTLS12, EXT_EMS,
    EXT_RENEGOTIATION_INFO, HS_CLIENT_HELLO, HS_CLIENT_KEY_EXCHANGE, HS_FINISHED, HS_HELLO_VERIFY,
    HS_SERVER_HELLO, HS_SERVER_HELLO_DONE, Protection, Reader, ReplayWindow, SERVER_PREFERENCE,
    Suite, handshake_msg, handshakes, prf, record_bytes, records,
};
use super::engine::DtlsError;
use ring::digest;
use std::collections::VecDeque;
use subtle::ConstantTimeEq;

enum State {
    AwaitVerify,
    AwaitServerHello,
    AwaitFinished,
    Established,
    Closed,
}

/// A DTLS 1.2 PSK client session.
pub struct PskClient {
    identity: Vec<u8>,
    psk: Vec<u8>,
    state: State,
    random: [u8; 32],
    server_random: [u8; 32],
    suite: Suite,
    ems: bool,
    transcript: Vec<u8>,
    master: [u8; 48],
    seq0: u64,
    seq1: u64,
    /// The last flight's records (content type, epoch, plaintext), sent
    /// again with fresh record numbers by [`PskClient::retransmit`].
    last_flight: Vec<(u8, u16, Vec<u8>)>,
    read: Option<Protection>,
    write: Option<Protection>,
    replay: ReplayWindow,
    tx: VecDeque<Vec<u8>>,
}

impl PskClient {
    /// A client for `identity`/`psk`; its first ClientHello is queued.
    ///
    /// Fails when the OS has no randomness.
    pub fn new(identity: &[u8], psk: &[u8]) -> Result<Self, DtlsError> {
        let mut random = [0u8; 32];
        getrandom::fill(&mut random).map_err(|_| DtlsError::Random)?;
        let mut c = Self {
            identity: identity.to_vec(),
            psk: psk.to_vec(),
            state: State::AwaitVerify,
            random,
            server_random: [0; 32],
            suite: Suite::PskAes128Ccm8,
            ems: false,
            transcript: Vec::new(),
            master: [0; 48],
            seq0: 0,
            seq1: 0,
            last_flight: Vec::new(),
            read: None,
            write: None,
            replay: ReplayWindow::default(),
            tx: VecDeque::new(),
        };
        let hello = c.hello(&[], 0);
        c.send_flight(hello);
        Ok(c)
    }

    fn hello(&mut self, cookie: &[u8], msg_seq: u16) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + cookie.len());
        b.extend_from_slice(&DTLS12);
        b.extend_from_slice(&self.random);
        b.push(0);
        b.push(u8::try_from(cookie.len()).unwrap_or(0));
        b.extend_from_slice(cookie);
        b.extend_from_slice(&6u16.to_be_bytes());
        for s in SERVER_PREFERENCE {
            b.extend_from_slice(&s.id().to_be_bytes());
        }
        b.extend_from_slice(&[1, 0]);
        let exts = [
            EXT_EMS.to_be_bytes()[0],
            EXT_EMS.to_be_bytes()[1],
            0,
            0,
            EXT_RENEGOTIATION_INFO.to_be_bytes()[0],
            EXT_RENEGOTIATION_INFO.to_be_bytes()[1],
            0,
            1,
            0,
        ];
        b.extend_from_slice(&u16::try_from(exts.len()).unwrap_or(0).to_be_bytes());
        b.extend_from_slice(&exts);
        handshake_msg(HS_CLIENT_HELLO, msg_seq, &b)
    }

    fn send_flight(&mut self, msg: Vec<u8>) {
        self.last_flight = vec![(CT_HANDSHAKE, 0, msg)];
        if let Err(e) = self.emit_flight() {
            tracing::debug!(error = %e, "DTLS client flight not sent");
        }
    }

    /// Queues the last flight as one datagram, every record with a new
    /// sequence number (RFC 6347 §4.2.4: a repeat is not a replay).
    fn emit_flight(&mut self) -> Result<(), DtlsError> {
        let mut d = Vec::new();
        for (ct, epoch, plain) in &self.last_flight {
            if *epoch == 0 {
                d.extend_from_slice(&record_bytes(*ct, DTLS12, 0, self.seq0, plain));
                self.seq0 += 1;
            } else {
                let w = self.write.as_ref().ok_or(DtlsError::Internal("no keys"))?;
                d.extend_from_slice(&w.seal(*ct, *epoch, self.seq1, plain)?);
                self.seq1 += 1;
            }
        }
        self.tx.push_back(d);
        Ok(())
    }

    /// Queues the last flight again (the caller's timer fired).
    pub fn retransmit(&mut self) {
        if !matches!(self.state, State::Established | State::Closed)
            && let Err(e) = self.emit_flight()
        {
            tracing::debug!(error = %e, "DTLS client flight not sent again");
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.tx.pop_front()
    }

    /// Whether the handshake completed.
    pub fn established(&self) -> bool {
        matches!(self.state, State::Established)
    }

    /// The negotiated suite.
    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// Protects `data` for the server.
    ///
    /// Fails before the handshake completed.
    pub fn write(&mut self, data: &[u8]) -> Result<(), DtlsError> {
        if !self.established() {
            return Err(DtlsError::NotEstablished);
        }
        let seq = self.seq1;
        self.seq1 += 1;
        let w = self.write.as_ref().ok_or(DtlsError::Internal("no keys"))?;
        let rec = w.seal(CT_APP, 1, seq, data)?;
        self.tx.push_back(rec);
        Ok(())
    }

    /// Queues close_notify.
    pub fn close(&mut self) {
        if self.established() {
            let seq = self.seq1;
            self.seq1 += 1;
            if let Some(w) = &self.write
                && let Ok(rec) = w.seal(CT_ALERT, 1, seq, &[1, ALERT_CLOSE_NOTIFY])
            {
                self.tx.push_back(rec);
            }
        }
        self.state = State::Closed;
    }

    /// Processes a datagram from the server; application data goes to `app`.
    ///
    /// Fails on a fatal alert, a Finished that does not verify, or a
    /// server that picked something we did not offer.
    pub fn on_datagram(&mut self, d: &[u8], app: &mut Vec<Vec<u8>>) -> Result<(), DtlsError> {
        for rec in records(d)? {
            match (rec.epoch, rec.content_type) {
                (0, CT_HANDSHAKE) => {
                    for m in handshakes(rec.body)? {
                        self.handshake0(m.msg_type, m.msg_seq, m.body)?;
                    }
                }
                (0, CT_ALERT) if rec.body.first() == Some(&2) => {
                    self.state = State::Closed;
                    return Err(DtlsError::PeerAlert(rec.body.get(1).copied().unwrap_or(0)));
                }
                (1, ct) => {
                    let Some(r) = &self.read else { continue };
                    if !self.replay.fresh(rec.seq) {
                        continue;
                    }
                    let Some(plain) = r.open(&rec) else { continue };
                    self.replay.mark(rec.seq);
                    match ct {
                        CT_HANDSHAKE => {
                            for m in handshakes(&plain)? {
                                if m.msg_type == HS_FINISHED
                                    && matches!(self.state, State::AwaitFinished)
                                {
                                    self.server_finished(m.body)?;
                                }
                            }
                        }
                        CT_APP if self.established() => app.push(plain),
                        CT_ALERT => {
                            self.state = State::Closed;
                            return Err(if plain.get(1) == Some(&ALERT_CLOSE_NOTIFY) {
                                DtlsError::PeerClosed
                            } else {
                                DtlsError::PeerAlert(plain.get(1).copied().unwrap_or(0))
                            });
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn handshake0(&mut self, typ: u8, seq: u16, body: &[u8]) -> Result<(), DtlsError> {
        match (&self.state, typ) {
            (State::AwaitVerify, HS_HELLO_VERIFY) => {
                let mut r = Reader(body);
                r.take(2)?;
                let cookie = r.vec8()?.to_vec();
                let hello = self.hello(&cookie, seq.wrapping_add(1));
                self.transcript = hello.clone();
                self.send_flight(hello);
                self.state = State::AwaitServerHello;
            }
            (State::AwaitServerHello, HS_SERVER_HELLO) => {
                let mut r = Reader(body);
                r.take(2)?;
                self.server_random.copy_from_slice(r.take(32)?);
                r.vec8()?;
                let id = r.u16()?;
                self.suite = SERVER_PREFERENCE
                    .into_iter()
                    .find(|s| s.id() == id)
                    .ok_or(DtlsError::NoCommonSuite)?;
                r.u8()?;
                if !r.0.is_empty() {
                    let mut ext = Reader(r.vec16()?);
                    while !ext.0.is_empty() {
                        let t = ext.u16()?;
                        ext.vec16()?;
                        self.ems |= t == EXT_EMS;
                    }
                }
                self.transcript
                    .extend_from_slice(&handshake_msg(HS_SERVER_HELLO, seq, body));
            }
            (State::AwaitServerHello, HS_SERVER_HELLO_DONE) => {
                self.transcript
                    .extend_from_slice(&handshake_msg(HS_SERVER_HELLO_DONE, seq, body));
                self.key_exchange(seq)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn key_exchange(&mut self, done_seq: u16) -> Result<(), DtlsError> {
        // Our message_seq: the hello with the cookie was done_seq - 1.
        let cke_seq = done_seq;
        let mut body = Vec::with_capacity(2 + self.identity.len());
        body.extend_from_slice(
            &u16::try_from(self.identity.len())
                .unwrap_or(0)
                .to_be_bytes(),
        );
        body.extend_from_slice(&self.identity);
        let cke = handshake_msg(HS_CLIENT_KEY_EXCHANGE, cke_seq, &body);
        self.transcript.extend_from_slice(&cke);
        let n = u16::try_from(self.psk.len()).unwrap_or(0).to_be_bytes();
        let mut pms = Vec::new();
        pms.extend_from_slice(&n);
        pms.resize(2 + self.psk.len(), 0);
        pms.extend_from_slice(&n);
        pms.extend_from_slice(&self.psk);
        if self.ems {
            let h = digest::digest(&digest::SHA256, &self.transcript);
            prf(
                &pms,
                b"extended master secret",
                &[h.as_ref()],
                &mut self.master,
            );
        } else {
            prf(
                &pms,
                b"master secret",
                &[&self.random, &self.server_random],
                &mut self.master,
            );
        }
        let mut kb = [0u8; 40];
        prf(
            &self.master,
            b"key expansion",
            &[&self.server_random, &self.random],
            &mut kb,
        );
        self.write = Some(Protection::new(self.suite, &kb[0..16], &kb[32..36])?);
        self.read = Some(Protection::new(self.suite, &kb[16..32], &kb[36..40])?);
        let h = digest::digest(&digest::SHA256, &self.transcript);
        let mut verify = [0u8; 12];
        prf(&self.master, b"client finished", &[h.as_ref()], &mut verify);
        let fin = handshake_msg(HS_FINISHED, cke_seq.wrapping_add(1), &verify);
        self.transcript.extend_from_slice(&fin);
        self.last_flight = vec![
            (CT_HANDSHAKE, 0, cke),
            (CT_CCS, 0, vec![1]),
            (CT_HANDSHAKE, 1, fin),
        ];
        self.emit_flight()?;
        self.state = State::AwaitFinished;
        Ok(())
    }

    fn server_finished(&mut self, body: &[u8]) -> Result<(), DtlsError> {
        let h = digest::digest(&digest::SHA256, &self.transcript);
        let mut expected = [0u8; 12];
        prf(
            &self.master,
            b"server finished",
            &[h.as_ref()],
            &mut expected,
        );
        if !bool::from(expected.ct_eq(body)) {
            self.state = State::Closed;
            return Err(DtlsError::AuthFailed);
        }
        self.transcript = Vec::new();
        self.state = State::Established;
        Ok(())
    }
}
