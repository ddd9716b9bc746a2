//! The device registry: devices and their access tokens, in `state.db`.
//!
//! Tokens are stored only as SHA-256 hashes; a device may also (or instead)
//! be known by the SHA-256 fingerprint of its TLS client certificate (the
//! DER leaf), for mTLS. The daemon keeps the active devices in memory (a
//! device fleet behind one gateway is small), so authentication never touches
//! SQLite; the CLI edits `state.db` directly and then asks a running daemon to
//! reload. Every reload bumps a generation number that live sessions watch
//! ([`Registry::subscribe`]), so a revocation closes them at once.
//!
//! Devices come from two places, recorded in `devices.source`: the CLI
//! (`sluice devices add`, `'cli'`) and the configuration's `[[devices]]`
//! (`'config'`: the local file or a signed fleet configuration, which
//! carries only the SHA-256 of each token). [`RegistryDb::provision`]
//! merges the configured list in at daemon start: missing devices are
//! added, changed ones updated (and un-revoked), configured devices no
//! longer listed are revoked (kept, so their history stays readable), and
//! CLI devices are never touched.
//!
//! A device may also hold a DTLS 1.2 pre-shared key for CoAP over DTLS: a
//! PSK identity (unique across devices; the client sends it in the
//! handshake and it names the device) and the key. Storage decision: the
//! key is kept in `state.db` as is, not hashed (the handshake needs the key
//! itself) and not encrypted (an encryption key on the same disk adds
//! nothing without a hardware key store). What protects it is the file's
//! mode: `statedb::open` makes `state.db` and its `-wal`/`-shm` files 0600.
//! The key never leaves the registry except through
//! [`Registry::psk_lookup`]: [`DeviceInfo`] (the CLI's `devices show`/`list`)
//! carries only the identity.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use sluice_cloud_sync::{DeviceName, statedb};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// state.db could not be opened.
    #[error(transparent)]
    State(#[from] statedb::StateDbError),
    /// A query failed.
    #[error("device registry in {path}: {source}")]
    Sqlite {
        /// state.db.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The name is not acceptable.
    #[error("device name {0:?} must be 1-64 characters of A-Z a-z 0-9 - _ .")]
    BadName(String),
    /// The type is not acceptable.
    #[error("device type {0:?} must be 1-64 characters of A-Z a-z 0-9 - _ .")]
    BadType(String),
    /// The token is not acceptable.
    #[error(
        "access token must be 1-128 printable ASCII characters without whitespace, '/', '?', '#', '+', '%'"
    )]
    BadToken,
    /// The name is taken.
    #[error("device {0:?} already exists")]
    Exists(String),
    /// The token is taken by another device.
    #[error("that access token is already in use by another device")]
    TokenInUse,
    /// The certificate fingerprint is registered to another device.
    #[error("that certificate fingerprint is already registered to another device")]
    CertInUse,
    /// The bridge glob is not acceptable.
    #[error("bridge glob {0:?} must be 1-64 characters of A-Z a-z 0-9 - _ . * ?")]
    BadGlob(String),
    /// The certificate fingerprint is not 64 hex digits.
    #[error("certificate fingerprint {0:?} must be a SHA-256 of 64 hex digits (colons allowed)")]
    BadFingerprint(String),
    /// No such device.
    #[error("no device named {0:?}")]
    NotFound(String),
    /// The device is revoked; changing its credentials needs it active.
    #[error("device {0:?} is revoked (`sluice devices rotate-token {0}` makes it active again)")]
    Revoked(String),
    /// The PSK identity is not acceptable.
    #[error("PSK identity {0:?} must be 1-128 bytes of UTF-8 without control characters")]
    BadPskIdentity(String),
    /// The pre-shared key is not acceptable (the reason never quotes the
    /// key).
    #[error("pre-shared key: {0}")]
    BadPskKey(String),
    /// The PSK identity is registered to another device.
    #[error("PSK identity {0:?} is already registered to another device")]
    PskIdentityTaken(String),
    /// A key was given without an identity for a device that has none.
    #[error("device {0:?} has no PSK identity yet; give one with --psk-identity")]
    NoPsk(String),
    /// The OS random source failed.
    #[error("cannot read random bytes for a token or key: {0}")]
    Random(getrandom::Error),
}

/// The longest PSK identity, in bytes (RFC 4279 allows 2^16-1; 128 is
/// plenty for a device name and keeps the handshake lookup cheap).
pub const PSK_IDENTITY_MAX_BYTES: usize = 128;

/// The longest pre-shared key, in bytes. RFC 4279 allows up to 2^16-1, but
/// libcoap's and other OpenSSL-based DTLS clients cap a PSK at 64 bytes
/// (`PSK_MAX_PSK_LEN`), so a longer key could never be used by them.
pub const PSK_KEY_MAX_BYTES: usize = 64;

/// The length of a key `sluice devices rotate-psk` generates: 128 bits.
pub const GENERATED_PSK_BYTES: usize = 16;

/// Whether `identity` is an acceptable PSK identity: 1-128 bytes of UTF-8
/// (guaranteed by `&str`) without control characters.
pub fn valid_psk_identity(identity: &str) -> bool {
    !identity.is_empty()
        && identity.len() <= PSK_IDENTITY_MAX_BYTES
        && !identity.chars().any(char::is_control)
}

/// Checks a pre-shared key's length: 1-64 bytes ([`PSK_KEY_MAX_BYTES`]).
///
/// Fails with [`RegistryError::BadPskKey`] otherwise.
pub fn check_psk_key(key: &[u8]) -> Result<(), RegistryError> {
    if key.is_empty() {
        return Err(RegistryError::BadPskKey("is empty".into()));
    }
    if key.len() > PSK_KEY_MAX_BYTES {
        return Err(RegistryError::BadPskKey(format!(
            "is {} bytes; at most {PSK_KEY_MAX_BYTES} (OpenSSL-based DTLS clients such as \
             libcoap's cannot use a longer one)",
            key.len()
        )));
    }
    Ok(())
}

/// Parses a pre-shared key written as hex: either case, surrounding
/// whitespace ignored, an optional `0x` prefix; 1-64 bytes.
///
/// Fails with [`RegistryError::BadPskKey`] when anything else is left, the
/// digit count is odd, or the length is out of range.
pub fn parse_psk_hex(text: &str) -> Result<Vec<u8>, RegistryError> {
    let t = text.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(RegistryError::BadPskKey(
            "must be written as hex digits (an optional 0x prefix)".into(),
        ));
    }
    if !t.len().is_multiple_of(2) {
        return Err(RegistryError::BadPskKey(
            "has an odd number of hex digits".into(),
        ));
    }
    let key = t
        .as_bytes()
        .chunks_exact(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| RegistryError::BadPskKey("is not hex".into()))
        })
        .collect::<Result<Vec<u8>, _>>()?;
    check_psk_key(&key)?;
    Ok(key)
}

/// A fresh pre-shared key: [`GENERATED_PSK_BYTES`] random bytes.
///
/// Fails only when the OS random source fails.
pub fn generate_psk() -> Result<Vec<u8>, RegistryError> {
    let mut key = vec![0u8; GENERATED_PSK_BYTES];
    getrandom::fill(&mut key).map_err(RegistryError::Random)?;
    Ok(key)
}

/// Whether `g` is an acceptable `--bridge-for` glob.
pub fn valid_glob(g: &str) -> bool {
    !g.is_empty()
        && g.len() <= 64
        && g.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*' | '?'))
}

/// Glob matching: `*` any run (also empty), `?` one character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A device as listed by the CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// Name.
    pub name: String,
    /// Type (device profile).
    #[serde(rename = "type")]
    pub kind: String,
    /// Registration time, unix ms.
    pub created_ms: i64,
    /// Whether its token was revoked.
    pub revoked: bool,
    /// SHA-256 of its TLS client certificate (lowercase hex), if registered.
    pub cert_sha256: Option<String>,
    /// Its DTLS PSK identity, if it has a pre-shared key (the key itself is
    /// never shown).
    pub psk_identity: Option<String>,
    /// Glob of device names it may publish for on mapped topics, if any.
    pub bridge_for: Option<String>,
    /// Who registered it: `cli` or `config` (`[[devices]]`).
    pub source: String,
}

/// A device listed in the configuration's `[[devices]]`, validated
/// ([`crate::config`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigDevice {
    /// Name.
    pub name: String,
    /// Type (device profile).
    pub kind: String,
    /// SHA-256 of its access token (the token itself never appears).
    pub token_sha256: [u8; 32],
    /// SHA-256 of its TLS client certificate, if it may use mTLS.
    pub cert_sha256: Option<[u8; 32]>,
    /// Glob of device names it may publish for on mapped topics.
    pub bridge_for: Option<String>,
}

/// What [`RegistryDb::provision`] changed, by device name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProvisionReport {
    /// Listed and newly registered.
    pub added: Vec<String>,
    /// Listed, already registered by configuration, and changed (or
    /// un-revoked).
    pub updated: Vec<String>,
    /// Registered by configuration earlier, no longer listed: revoked.
    pub revoked: Vec<String>,
    /// Listed but left alone, with the reason (a CLI device of that name,
    /// a token or certificate another device holds).
    pub skipped: Vec<(String, String)>,
}

/// Checks a device name or type: 1-64 characters of A-Z a-z 0-9 - _ .
pub fn valid_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Whether `t` is an acceptable access token (DESIGN.md: 1–128 printable
/// ASCII characters without whitespace, `/`, `?`, `#`, `+`, `%`).
pub fn valid_token(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b'?' | b'#' | b'+' | b'%'))
}

/// A fresh token: 20 random URL-safe characters.
///
/// Fails only when the OS random source fails.
pub fn generate_token() -> Result<String, RegistryError> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = [0u8; 20];
    getrandom::fill(&mut bytes).map_err(RegistryError::Random)?;
    Ok(bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(b & 63)]))
        .collect())
}

/// Parses a certificate's SHA-256 fingerprint: 64 hex digits, either case,
/// colons allowed anywhere (`openssl x509 -fingerprint -sha256` prints
/// `AB:CD:…`).
///
/// Fails when anything else is left or the length is wrong.
pub fn parse_cert_sha256(text: &str) -> Result<[u8; 32], RegistryError> {
    let bad = || RegistryError::BadFingerprint(text.into());
    let digits: Vec<u8> = text.bytes().filter(|b| *b != b':').collect();
    // from_str_radix alone would take a "+" sign.
    if digits.len() != 64 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Lowercase hex of a fingerprint.
pub fn fingerprint_hex(fp: &[u8]) -> String {
    fp.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `data` (ring's: the binary carries one SHA-256).
fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    out
}

/// The SHA-256 fingerprint of a DER certificate.
pub fn cert_fingerprint(der: &[u8]) -> [u8; 32] {
    sha256(der)
}

/// The SHA-256 of an access token, as stored (`token_sha256`) and as a
/// `[[devices]]` entry gives it (`printf %s TOKEN | sha256sum`).
pub fn token_hash(token: &str) -> [u8; 32] {
    sha256(token.as_bytes())
}

/// A stand-in token hash for a configured device whose hash is moving to
/// another device in the same merge (the column is UNIQUE). No token
/// hashes to it: a token cannot contain `/`.
fn placeholder_hash(name: &str) -> [u8; 32] {
    sha256(format!("sluice-unassigned/{name}").as_bytes())
}

/// A registered device as the merge sees it.
struct StoredDevice {
    kind: String,
    token_sha256: Vec<u8>,
    cert_sha256: Option<Vec<u8>>,
    bridge_for: Option<String>,
    revoked: bool,
    from_config: bool,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Registry writes and reads against `state.db` (CLI side).
pub struct RegistryDb {
    path: PathBuf,
    conn: Connection,
}

impl RegistryDb {
    /// Opens (creating if needed) the registry in `state.db`.
    ///
    /// Fails when state.db cannot be opened or migrated.
    pub fn open(state_db: &Path) -> Result<Self, RegistryError> {
        Ok(Self {
            path: state_db.to_owned(),
            conn: statedb::open(state_db)?,
        })
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> RegistryError + '_ {
        |source| RegistryError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Registers a device; returns its token (the one given, or a generated one).
    ///
    /// Fails when the name, type or token is invalid, or the name or token is taken.
    pub fn add(
        &self,
        name: &str,
        kind: &str,
        token: Option<&str>,
    ) -> Result<String, RegistryError> {
        self.add_with_cert(name, kind, token, None, None)
    }

    /// Registers a device, optionally with its client certificate's SHA-256
    /// and a DTLS pre-shared key `(identity, key)`, in one insert; returns
    /// its token (the one given, or a generated one: a device known by its
    /// certificate or PSK still gets a token, for the HTTP API).
    ///
    /// Fails when the name, type, token, PSK identity or key is invalid, or
    /// the name, token, fingerprint or PSK identity is taken.
    pub fn add_with_cert(
        &self,
        name: &str,
        kind: &str,
        token: Option<&str>,
        cert_sha256: Option<&[u8; 32]>,
        psk: Option<(&str, &[u8])>,
    ) -> Result<String, RegistryError> {
        if !valid_ident(name) {
            return Err(RegistryError::BadName(name.into()));
        }
        if !valid_ident(kind) {
            return Err(RegistryError::BadType(kind.into()));
        }
        if let Some((identity, key)) = psk {
            if !valid_psk_identity(identity) {
                return Err(RegistryError::BadPskIdentity(identity.into()));
            }
            check_psk_key(key)?;
        }
        let token = match token {
            Some(t) if valid_token(t) => t.to_owned(),
            Some(_) => return Err(RegistryError::BadToken),
            None => generate_token()?,
        };
        let hash = token_hash(&token);
        let exists: Option<i64> = self
            .conn
            .query_row("SELECT 1 FROM devices WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.sql())?;
        if exists.is_some() {
            return Err(RegistryError::Exists(name.into()));
        }
        if let Some(fp) = cert_sha256 {
            let taken: Option<i64> = self
                .conn
                .query_row(
                    "SELECT 1 FROM devices WHERE cert_sha256 = ?1",
                    [&fp[..]],
                    |r| r.get(0),
                )
                .optional()
                .map_err(self.sql())?;
            if taken.is_some() {
                return Err(RegistryError::CertInUse);
            }
        }
        if let Some((identity, _)) = psk
            && holder(&self.conn, "psk_identity", identity)
                .map_err(self.sql())?
                .is_some()
        {
            return Err(RegistryError::PskIdentityTaken(identity.into()));
        }
        self.insert_or_token_conflict(
            "INSERT INTO devices (name, type, token_sha256, created_ms, cert_sha256, psk_identity, psk_key) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                name,
                kind,
                &hash[..],
                now_ms(),
                cert_sha256.map(|f| &f[..]),
                psk.map(|(identity, _)| identity),
                psk.map(|(_, key)| key),
            ],
        )?;
        Ok(token)
    }

    fn insert_or_token_conflict(
        &self,
        sql: &str,
        p: impl rusqlite::Params,
    ) -> Result<usize, RegistryError> {
        match self.conn.execute(sql, p) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(RegistryError::TokenInUse)
            }
            other => other.map_err(self.sql()),
        }
    }

    /// All devices, by name.
    ///
    /// Fails when the query fails.
    pub fn list(&self) -> Result<Vec<DeviceInfo>, RegistryError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT name, type, created_ms, revoked, cert_sha256, bridge_for, source, \
                 psk_identity FROM devices ORDER BY name",
            )
            .map_err(self.sql())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(DeviceInfo {
                    name: r.get(0)?,
                    kind: r.get(1)?,
                    created_ms: r.get(2)?,
                    revoked: r.get::<_, i64>(3)? != 0,
                    cert_sha256: r.get::<_, Option<Vec<u8>>>(4)?.map(|f| fingerprint_hex(&f)),
                    bridge_for: r.get(5)?,
                    source: r.get(6)?,
                    psk_identity: r.get(7)?,
                })
            })
            .map_err(self.sql())?;
        rows.collect::<Result<_, _>>().map_err(self.sql())
    }

    /// One device.
    ///
    /// Fails when it does not exist.
    pub fn show(&self, name: &str) -> Result<DeviceInfo, RegistryError> {
        self.list()?
            .into_iter()
            .find(|d| d.name == name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))
    }

    /// Lets `name` publish for the devices matching `glob` on mapped legacy
    /// topics (`None` takes that away).
    ///
    /// Fails on a bad glob or an unknown device.
    pub fn set_bridge_for(&self, name: &str, glob: Option<&str>) -> Result<(), RegistryError> {
        if let Some(g) = glob
            && !valid_glob(g)
        {
            return Err(RegistryError::BadGlob(g.into()));
        }
        let n = self
            .conn
            .execute(
                "UPDATE devices SET bridge_for = ?1 WHERE name = ?2",
                params![glob, name],
            )
            .map_err(self.sql())?;
        if n == 0 {
            return Err(RegistryError::NotFound(name.into()));
        }
        Ok(())
    }

    /// Revokes a device's token (the device stays listed, marked revoked).
    ///
    /// Fails when it does not exist.
    pub fn revoke(&self, name: &str) -> Result<(), RegistryError> {
        let n = self
            .conn
            .execute("UPDATE devices SET revoked = 1 WHERE name = ?1", [name])
            .map_err(self.sql())?;
        if n == 0 {
            return Err(RegistryError::NotFound(name.into()));
        }
        Ok(())
    }

    /// Gives a device a new generated token (and un-revokes it); returns it.
    ///
    /// Fails when it does not exist.
    pub fn rotate_token(&self, name: &str) -> Result<String, RegistryError> {
        let token = generate_token()?;
        let n = self.insert_or_token_conflict(
            "UPDATE devices SET token_sha256 = ?1, revoked = 0 WHERE name = ?2",
            params![&token_hash(&token)[..], name],
        )?;
        if n == 0 {
            return Err(RegistryError::NotFound(name.into()));
        }
        Ok(token)
    }

    /// Sets an active device's DTLS pre-shared key: `key`, under `identity`
    /// when given, else under the identity it already has. A running daemon
    /// uses it after its next registry reload; sessions on the old key are
    /// then re-checked by the listener.
    ///
    /// Fails when the identity or key is invalid, the device is unknown
    /// ([`RegistryError::NotFound`]) or revoked ([`RegistryError::Revoked`]),
    /// no identity is given and it has none ([`RegistryError::NoPsk`]), or
    /// another device holds the identity ([`RegistryError::PskIdentityTaken`]).
    pub fn set_psk(
        &self,
        name: &str,
        identity: Option<&str>,
        key: &[u8],
    ) -> Result<(), RegistryError> {
        if let Some(id) = identity
            && !valid_psk_identity(id)
        {
            return Err(RegistryError::BadPskIdentity(id.into()));
        }
        check_psk_key(key)?;
        // `unchecked_transaction` because `self` is shared; this connection
        // runs nothing else meanwhile. A dropped transaction rolls back.
        let tx = self.conn.unchecked_transaction().map_err(self.sql())?;
        let row: Option<(bool, Option<String>)> = tx
            .query_row(
                "SELECT revoked, psk_identity FROM devices WHERE name = ?1",
                [name],
                |r| Ok((r.get::<_, i64>(0)? != 0, r.get(1)?)),
            )
            .optional()
            .map_err(self.sql())?;
        let Some((revoked, current)) = row else {
            return Err(RegistryError::NotFound(name.into()));
        };
        if revoked {
            return Err(RegistryError::Revoked(name.into()));
        }
        let identity = match (identity, current) {
            (Some(id), _) => id.to_owned(),
            (None, Some(id)) => id,
            (None, None) => return Err(RegistryError::NoPsk(name.into())),
        };
        if holder(&tx, "psk_identity", &identity)
            .map_err(self.sql())?
            .is_some_and(|other| other != name)
        {
            return Err(RegistryError::PskIdentityTaken(identity));
        }
        tx.execute(
            "UPDATE devices SET psk_identity = ?1, psk_key = ?2 WHERE name = ?3",
            params![identity, key, name],
        )
        .map_err(self.sql())?;
        tx.commit().map_err(self.sql())
    }

    /// Registers a device known only by the SHA-256 of its token (the
    /// `[[devices]]` path: the plaintext token never reaches the gateway),
    /// recording `from_config` as its source.
    ///
    /// Fails when the name, type or glob is invalid, or the name, token
    /// hash or fingerprint is taken.
    pub fn add_hashed(
        &self,
        device: &ConfigDevice,
        from_config: bool,
    ) -> Result<(), RegistryError> {
        if !valid_ident(&device.name) {
            return Err(RegistryError::BadName(device.name.clone()));
        }
        if !valid_ident(&device.kind) {
            return Err(RegistryError::BadType(device.kind.clone()));
        }
        if let Some(g) = device.bridge_for.as_deref()
            && !valid_glob(g)
        {
            return Err(RegistryError::BadGlob(g.into()));
        }
        if holder(&self.conn, "name", &device.name)
            .map_err(self.sql())?
            .is_some()
        {
            return Err(RegistryError::Exists(device.name.clone()));
        }
        if let Some(fp) = &device.cert_sha256
            && holder(&self.conn, "cert_sha256", &fp[..])
                .map_err(self.sql())?
                .is_some()
        {
            return Err(RegistryError::CertInUse);
        }
        self.insert_or_token_conflict(
            "INSERT INTO devices (name, type, token_sha256, created_ms, cert_sha256, bridge_for, source) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                device.name,
                device.kind,
                &device.token_sha256[..],
                now_ms(),
                device.cert_sha256.as_ref().map(|f| &f[..]),
                device.bridge_for,
                if from_config { "config" } else { "cli" },
            ],
        )?;
        Ok(())
    }

    /// Merges the configuration's `[[devices]]` into the registry, in one
    /// transaction: a listed device missing is added (source `config`); one
    /// registered by configuration gets the listed type, token hash,
    /// certificate and bridge glob, and is un-revoked; configured devices
    /// no longer listed are revoked. CLI devices are never changed: a
    /// listed name or credential a CLI device holds is skipped (reported).
    /// `devices` is assumed validated (unique names, hashes, fingerprints).
    ///
    /// Fails when state.db cannot be read or written; nothing changes then.
    pub fn provision(&self, devices: &[ConfigDevice]) -> Result<ProvisionReport, RegistryError> {
        // `unchecked_transaction` because `self` is shared; this connection
        // runs nothing else meanwhile. A dropped transaction rolls back.
        let tx = self.conn.unchecked_transaction().map_err(self.sql())?;
        let report = merge(&tx, devices).map_err(self.sql())?;
        tx.commit().map_err(self.sql())?;
        Ok(report)
    }

    /// The active devices keyed by token hash, by certificate fingerprint
    /// and by PSK identity.
    fn active(&self) -> Result<Active, RegistryError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT token_sha256, name, cert_sha256, bridge_for, type, psk_identity, psk_key \
                 FROM devices WHERE revoked = 0",
            )
            .map_err(self.sql())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<Vec<u8>>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<Vec<u8>>>(6)?,
                ))
            })
            .map_err(self.sql())?;
        let mut out = Active::default();
        for row in rows {
            let (hash, name, cert, bridge, kind, psk_identity, psk_key) =
                row.map_err(self.sql())?;
            let name = DeviceName::new(name);
            if let (Some(identity), Some(key)) = (psk_identity, psk_key) {
                out.psks.insert(identity.into_bytes(), (name.clone(), key));
            }
            out.names.insert(name.clone());
            out.types.insert(name.clone(), kind);
            if let Some(g) = bridge {
                out.bridges.insert(name.clone(), g);
            }
            if let Some(fp) = cert.and_then(|c| <[u8; 32]>::try_from(c.as_slice()).ok()) {
                out.certs.insert(fp, name.clone());
            }
            if let Ok(h) = <[u8; 32]>::try_from(hash.as_slice()) {
                out.tokens.insert(h, name);
            }
        }
        Ok(out)
    }
}

/// The device whose `column` holds `value`, if any.
fn holder(
    conn: &Connection,
    column: &'static str,
    value: impl rusqlite::ToSql,
) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        &format!("SELECT name FROM devices WHERE {column} = ?1"),
        [value],
        |r| r.get(0),
    )
    .optional()
}

/// [`RegistryDb::provision`]'s work, inside its transaction.
fn merge(conn: &Connection, devices: &[ConfigDevice]) -> rusqlite::Result<ProvisionReport> {
    let mut report = ProvisionReport::default();
    let mut stored: HashMap<String, StoredDevice> = HashMap::new();
    {
        let mut stmt = conn.prepare(
            "SELECT name, type, token_sha256, cert_sha256, bridge_for, revoked, source FROM devices",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                StoredDevice {
                    kind: r.get(1)?,
                    token_sha256: r.get(2)?,
                    cert_sha256: r.get(3)?,
                    bridge_for: r.get(4)?,
                    revoked: r.get::<_, i64>(5)? != 0,
                    from_config: r.get::<_, String>(6)? == "config",
                },
            ))
        })?;
        for row in rows {
            let (name, d) = row?;
            stored.insert(name, d);
        }
    }
    let listed: HashMap<&str, &ConfigDevice> =
        devices.iter().map(|d| (d.name.as_str(), d)).collect();
    // Credentials moving between configured devices (a swap, a rename):
    // free them first so the UNIQUE columns do not refuse the moves.
    for (name, s) in stored.iter().filter(|(_, s)| s.from_config) {
        let wanted_elsewhere = |hash: &[u8], cert: bool| {
            devices.iter().any(|d| {
                d.name != *name
                    && if cert {
                        d.cert_sha256.is_some_and(|c| c[..] == *hash)
                    } else {
                        d.token_sha256[..] == *hash
                    }
            })
        };
        let own = listed.get(name.as_str());
        if own.is_some_and(|d| d.token_sha256[..] != s.token_sha256[..])
            || wanted_elsewhere(&s.token_sha256, false)
        {
            conn.execute(
                "UPDATE devices SET token_sha256 = ?1 WHERE name = ?2",
                params![&placeholder_hash(name)[..], name],
            )?;
        }
        if let Some(c) = &s.cert_sha256
            && (own.is_some_and(|d| d.cert_sha256.map(|x| x.to_vec()).as_ref() != Some(c))
                || wanted_elsewhere(c, true))
        {
            conn.execute(
                "UPDATE devices SET cert_sha256 = NULL WHERE name = ?1",
                [name],
            )?;
        }
    }
    for d in devices {
        let old = stored.get(&d.name);
        if old.is_some_and(|s| !s.from_config) {
            report.skipped.push((
                d.name.clone(),
                "a device of that name was added with the CLI; it is left as it is".into(),
            ));
            continue;
        }
        if let Some(other) =
            holder(conn, "token_sha256", &d.token_sha256[..])?.filter(|o| *o != d.name)
        {
            report.skipped.push((
                d.name.clone(),
                format!("its token_sha256 is the token of device {other:?}"),
            ));
            continue;
        }
        if let Some(fp) = &d.cert_sha256
            && let Some(other) = holder(conn, "cert_sha256", &fp[..])?.filter(|o| *o != d.name)
        {
            report.skipped.push((
                d.name.clone(),
                format!("its cert_sha256 is registered to device {other:?}"),
            ));
            continue;
        }
        let cert = d.cert_sha256.as_ref().map(|f| &f[..]);
        match old {
            None => {
                conn.execute(
                    "INSERT INTO devices \
                     (name, type, token_sha256, created_ms, cert_sha256, bridge_for, source) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'config')",
                    params![
                        d.name,
                        d.kind,
                        &d.token_sha256[..],
                        now_ms(),
                        cert,
                        d.bridge_for
                    ],
                )?;
                report.added.push(d.name.clone());
            }
            Some(s) => {
                let same = s.kind == d.kind
                    && s.token_sha256[..] == d.token_sha256[..]
                    && s.cert_sha256.as_deref() == cert
                    && s.bridge_for == d.bridge_for
                    && !s.revoked;
                // Written even when the same: the first loop may have
                // moved a credential aside.
                conn.execute(
                    "UPDATE devices SET type = ?1, token_sha256 = ?2, cert_sha256 = ?3, \
                     bridge_for = ?4, revoked = 0 WHERE name = ?5",
                    params![d.kind, &d.token_sha256[..], cert, d.bridge_for, d.name],
                )?;
                if !same {
                    report.updated.push(d.name.clone());
                }
            }
        }
    }
    let mut gone: Vec<&String> = stored
        .iter()
        .filter(|(name, s)| s.from_config && !s.revoked && !listed.contains_key(name.as_str()))
        .map(|(name, _)| name)
        .collect();
    gone.sort();
    for name in gone {
        conn.execute("UPDATE devices SET revoked = 1 WHERE name = ?1", [name])?;
        report.revoked.push(name.clone());
    }
    report.added.sort();
    report.updated.sort();
    Ok(report)
}

/// The devices that can authenticate, by credential.
#[derive(Default)]
struct Active {
    tokens: HashMap<[u8; 32], DeviceName>,
    certs: HashMap<[u8; 32], DeviceName>,
    names: std::collections::HashSet<DeviceName>,
    bridges: HashMap<DeviceName, String>,
    types: HashMap<DeviceName, String>,
    /// PSK identity (as the handshake carries it) -> device and key.
    psks: HashMap<Vec<u8>, (DeviceName, Vec<u8>)>,
}

/// The daemon's in-memory view of the active devices.
pub struct Registry {
    state_db: PathBuf,
    active: RwLock<Active>,
    generation: watch::Sender<u64>,
}

impl Registry {
    /// Loads the active devices from `state.db`.
    ///
    /// Fails when state.db cannot be read.
    pub fn load(state_db: &Path) -> Result<Self, RegistryError> {
        let active = RegistryDb::open(state_db)?.active()?;
        Ok(Self {
            state_db: state_db.to_owned(),
            active: RwLock::new(active),
            generation: watch::Sender::new(0),
        })
    }

    /// The reload generation: it changes after every reload, when a live
    /// session must check that its device still authenticates.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Re-reads the active devices (after the CLI changed them). Blocking:
    /// call from a blocking thread.
    ///
    /// Fails when state.db cannot be read; the old view is kept then.
    pub fn reload(&self) -> Result<usize, RegistryError> {
        let fresh = RegistryDb::open(&self.state_db)?.active()?;
        let n = fresh.tokens.len();
        if let Ok(mut g) = self.active.write() {
            *g = fresh;
        }
        self.generation.send_modify(|g| *g += 1);
        Ok(n)
    }

    /// The device whose access token this is, if it is registered and not
    /// revoked.
    pub fn authenticate(&self, token: &str) -> Option<DeviceName> {
        let hash = token_hash(token);
        let g = self.active.read().ok()?;
        let (stored, name) = g.tokens.get_key_value(&hash)?;
        bool::from(stored.ct_eq(&hash)).then(|| name.clone())
    }

    /// The device whose client certificate has this SHA-256 fingerprint, if
    /// it is registered and not revoked.
    pub fn authenticate_cert(&self, fingerprint: &[u8; 32]) -> Option<DeviceName> {
        self.active.read().ok()?.certs.get(fingerprint).cloned()
    }

    /// The device and pre-shared key registered under this DTLS PSK
    /// identity, if that device is registered and not revoked. Only takes
    /// the in-memory read lock (never SQLite), so a DTLS handshake may call
    /// it inline. After a reload ([`Registry::subscribe`]) a revoked device
    /// gives `None` and a rotated key the new key: a live session must look
    /// its identity up again then and close when the answer changed.
    pub fn psk_lookup(&self, identity: &[u8]) -> Option<(DeviceName, Vec<u8>)> {
        self.active.read().ok()?.psks.get(identity).cloned()
    }

    /// Whether `device` may publish data attributed to `target`: itself, or
    /// a name its `bridge_for` glob matches.
    pub fn may_speak_for(&self, device: &DeviceName, target: &str) -> bool {
        device.as_str() == target
            || self.active.read().is_ok_and(|g| {
                g.bridges
                    .get(device)
                    .is_some_and(|glob| glob_match(glob, target))
            })
    }

    /// The registered type (profile) of an active device.
    pub fn device_type(&self, name: &DeviceName) -> Option<String> {
        self.active.read().ok()?.types.get(name).cloned()
    }

    /// Whether `name` is a registered device that is not revoked.
    pub fn is_active(&self, name: &DeviceName) -> bool {
        self.active.read().is_ok_and(|g| g.names.contains(name))
    }

    /// The active devices with their types, by name.
    pub fn active_devices(&self) -> Vec<(DeviceName, String)> {
        let Ok(g) = self.active.read() else {
            return Vec::new();
        };
        let mut out: Vec<(DeviceName, String)> = g
            .names
            .iter()
            .map(|n| (n.clone(), g.types.get(n).cloned().unwrap_or_default()))
            .collect();
        out.sort();
        out
    }

    /// How many devices can authenticate.
    pub fn active_count(&self) -> usize {
        self.active.read().map_or(0, |g| g.tokens.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shell_globs() {
        for (p, t, m) in [
            ("*", "", true),
            ("*", "abc", true),
            ("sensor-*", "sensor-1", true),
            ("sensor-*", "sensors", false),
            ("s?n*", "sun-7", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("abc", "abc", true),
            ("abc", "abcd", false),
        ] {
            assert_eq!(glob_match(p, t), m, "{p} vs {t}");
        }
        assert!(valid_glob("floor-2-*"));
        assert!(!valid_glob("a/b"));
        assert!(!valid_glob(""));
    }

    #[test]
    fn tokens_follow_the_contract() {
        assert!(valid_token("A1_b-2.c~"));
        for bad in ["", "a b", "a/b", "a?b", "a#b", "a+b", "a%b", "ä"] {
            assert!(!valid_token(bad), "{bad:?}");
        }
        assert!(!valid_token(&"x".repeat(129)));
        let t = generate_token().unwrap();
        assert_eq!(t.len(), 20);
        assert!(valid_token(&t));
    }

    #[test]
    fn add_authenticate_revoke_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        let db = RegistryDb::open(&p).unwrap();
        let tok = db.add("dev-1", "sensor", None).unwrap();
        db.add("dev-2", "sensor", Some("fixed-token")).unwrap();
        assert!(matches!(
            db.add("dev-1", "x", None),
            Err(RegistryError::Exists(_))
        ));
        assert!(matches!(
            db.add("dev-3", "x", Some("fixed-token")),
            Err(RegistryError::TokenInUse)
        ));
        let reg = Registry::load(&p).unwrap();
        assert_eq!(reg.authenticate(&tok).unwrap().as_str(), "dev-1");
        assert_eq!(reg.authenticate("fixed-token").unwrap().as_str(), "dev-2");
        assert!(reg.authenticate("nope").is_none());

        db.revoke("dev-1").unwrap();
        reg.reload().unwrap();
        assert!(reg.authenticate(&tok).is_none());
        assert!(db.show("dev-1").unwrap().revoked);

        let tok2 = db.rotate_token("dev-1").unwrap();
        reg.reload().unwrap();
        assert_eq!(reg.authenticate(&tok2).unwrap().as_str(), "dev-1");
        assert!(reg.authenticate(&tok).is_none());
        assert!(matches!(
            db.revoke("ghost"),
            Err(RegistryError::NotFound(_))
        ));
    }

    #[test]
    fn fingerprints_parse_in_either_case_with_or_without_colons() {
        let hex = "AB".repeat(32);
        let want = [0xab; 32];
        assert_eq!(parse_cert_sha256(&hex).unwrap(), want);
        assert_eq!(parse_cert_sha256(&hex.to_lowercase()).unwrap(), want);
        let colons = vec!["aB"; 32].join(":");
        assert_eq!(parse_cert_sha256(&colons).unwrap(), want);
        assert_eq!(fingerprint_hex(&want), "ab".repeat(32));
        for bad in [
            String::new(),
            "ab".repeat(31),
            "ab".repeat(33),
            format!("{}zz", "ab".repeat(31)),
            format!("{}+1", "ab".repeat(31)),
            format!("SHA256 Fingerprint={hex}"),
            format!("{}éa", "ab".repeat(31)),
        ] {
            assert!(
                matches!(
                    parse_cert_sha256(&bad),
                    Err(RegistryError::BadFingerprint(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_certificate_authenticates_its_device_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        let db = RegistryDb::open(&p).unwrap();
        let fp = cert_fingerprint(b"a DER certificate");
        let tok = db.add_with_cert("cam", "t", None, Some(&fp), None).unwrap();
        assert!(matches!(
            db.add_with_cert("cam-2", "t", None, Some(&fp), None),
            Err(RegistryError::CertInUse)
        ));
        assert_eq!(
            db.show("cam").unwrap().cert_sha256,
            Some(fingerprint_hex(&fp))
        );
        let reg = Registry::load(&p).unwrap();
        let generation = reg.subscribe();
        assert_eq!(reg.authenticate_cert(&fp).unwrap().as_str(), "cam");
        assert_eq!(reg.authenticate(&tok).unwrap().as_str(), "cam");
        assert!(reg.authenticate_cert(&[0; 32]).is_none());
        db.revoke("cam").unwrap();
        reg.reload().unwrap();
        assert!(generation.has_changed().unwrap());
        assert!(reg.authenticate_cert(&fp).is_none());
    }

    #[test]
    fn a_device_added_with_a_psk_is_found_by_its_identity() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        let db = RegistryDb::open(&p).unwrap();
        let tok = db
            .add_with_cert("coap-1", "t", None, None, Some(("dev-1", b"secret1")))
            .unwrap();
        db.add("plain", "t", None).unwrap();
        let reg = Registry::load(&p).unwrap();
        let (name, key) = reg.psk_lookup(b"dev-1").unwrap();
        assert_eq!((name.as_str(), key.as_slice()), ("coap-1", &b"secret1"[..]));
        assert_eq!(reg.authenticate(&tok).unwrap().as_str(), "coap-1");
        assert!(reg.psk_lookup(b"dev-2").is_none());
        assert!(reg.psk_lookup(b"").is_none());
        assert!(
            reg.psk_lookup(b"coap-1").is_none(),
            "the name is not the identity"
        );
        let shown = db.show("coap-1").unwrap();
        assert_eq!(shown.psk_identity.as_deref(), Some("dev-1"));
        assert_eq!(db.show("plain").unwrap().psk_identity, None);
        let json = serde_json::to_string(&db.list().unwrap()).unwrap();
        assert!(json.contains(r#""psk_identity":"dev-1""#), "{json}");
        assert!(!json.contains("secret1"), "the key is never listed");
        assert!(
            !json.contains(&fingerprint_hex(b"secret1")),
            "not even as hex"
        );
    }

    #[test]
    fn a_psk_identity_belongs_to_one_device() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        let db = RegistryDb::open(&p).unwrap();
        db.add_with_cert("a", "t", None, None, Some(("id-a", b"k")))
            .unwrap();
        db.add("b", "t", None).unwrap();
        assert!(matches!(
            db.add_with_cert("c", "t", None, None, Some(("id-a", b"k2"))),
            Err(RegistryError::PskIdentityTaken(id)) if id == "id-a"
        ));
        assert!(
            matches!(db.show("c"), Err(RegistryError::NotFound(_))),
            "nothing added"
        );
        assert!(matches!(
            db.set_psk("b", Some("id-a"), b"k2"),
            Err(RegistryError::PskIdentityTaken(_))
        ));
        // A revoked holder keeps its identity.
        db.revoke("a").unwrap();
        assert!(matches!(
            db.set_psk("b", Some("id-a"), b"k2"),
            Err(RegistryError::PskIdentityTaken(_))
        ));
        db.set_psk("b", Some("id-b"), b"k2").unwrap();
        assert_eq!(db.show("b").unwrap().psk_identity.as_deref(), Some("id-b"));
    }

    #[test]
    fn revoking_a_psk_device_removes_it_from_lookup_at_the_next_reload() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        let db = RegistryDb::open(&p).unwrap();
        db.add_with_cert("d", "t", None, None, Some(("id-d", b"key")))
            .unwrap();
        let reg = Registry::load(&p).unwrap();
        let generation = reg.subscribe();
        db.revoke("d").unwrap();
        assert!(reg.psk_lookup(b"id-d").is_some(), "until the reload");
        reg.reload().unwrap();
        assert!(generation.has_changed().unwrap());
        assert!(reg.psk_lookup(b"id-d").is_none());
        assert!(matches!(
            db.set_psk("d", None, b"new"),
            Err(RegistryError::Revoked(n)) if n == "d"
        ));
    }

    #[test]
    fn set_psk_rotates_the_key_and_may_rename_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        let db = RegistryDb::open(&p).unwrap();
        db.add("d", "t", None).unwrap();
        assert!(matches!(
            db.set_psk("d", None, b"k1"),
            Err(RegistryError::NoPsk(n)) if n == "d"
        ));
        db.set_psk("d", Some("id-1"), b"k1").unwrap();
        let reg = Registry::load(&p).unwrap();
        assert_eq!(reg.psk_lookup(b"id-1").unwrap().1, b"k1");

        let k2 = generate_psk().unwrap();
        assert_eq!(k2.len(), GENERATED_PSK_BYTES);
        db.set_psk("d", None, &k2).unwrap();
        assert_eq!(
            reg.psk_lookup(b"id-1").unwrap().1,
            b"k1",
            "until the reload"
        );
        reg.reload().unwrap();
        let (name, key) = reg.psk_lookup(b"id-1").unwrap();
        assert_eq!((name.as_str(), key), ("d", k2.clone()));

        db.set_psk("d", Some("id-2"), &k2).unwrap();
        reg.reload().unwrap();
        assert!(reg.psk_lookup(b"id-1").is_none());
        assert_eq!(reg.psk_lookup(b"id-2").unwrap().0.as_str(), "d");
        // Setting the identity a device already holds is no conflict.
        db.set_psk("d", Some("id-2"), b"k3").unwrap();

        assert!(matches!(
            db.set_psk("ghost", Some("x"), b"k"),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            db.set_psk("d", Some(""), b"k"),
            Err(RegistryError::BadPskIdentity(_))
        ));
        assert!(matches!(
            db.set_psk("d", None, b""),
            Err(RegistryError::BadPskKey(_))
        ));
        assert!(matches!(
            db.set_psk("d", None, &[7; 65]),
            Err(RegistryError::BadPskKey(_))
        ));
        reg.reload().unwrap();
        assert_eq!(
            reg.psk_lookup(b"id-2").unwrap().1,
            b"k3",
            "failed calls changed nothing"
        );
    }

    #[test]
    fn psk_identities_and_keys_are_checked_before_anything_is_stored() {
        assert!(valid_psk_identity("dev-1"));
        assert!(valid_psk_identity("Client_identity"));
        assert!(valid_psk_identity("room 4 / sensor ä"));
        assert!(valid_psk_identity(&"x".repeat(128)));
        for bad in [
            String::new(),
            "x".repeat(129),
            "a\nb".into(),
            "a\0b".into(),
            "\u{7f}".into(),
        ] {
            assert!(!valid_psk_identity(&bad), "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let db = RegistryDb::open(&dir.path().join("state.db")).unwrap();
        assert!(matches!(
            db.add_with_cert("d", "t", None, None, Some(("a\tb", b"k"))),
            Err(RegistryError::BadPskIdentity(_))
        ));
        assert!(matches!(
            db.add_with_cert("d", "t", None, None, Some(("id", &[0; 65]))),
            Err(RegistryError::BadPskKey(_))
        ));
        assert!(matches!(
            db.add_with_cert("d", "t", None, None, Some(("id", b""))),
            Err(RegistryError::BadPskKey(_))
        ));
        assert!(db.list().unwrap().is_empty());
    }

    #[test]
    fn psk_hex_parses_in_either_case_trimmed_with_an_optional_0x() {
        for (text, want) in [
            ("73656372657431", b"secret1".to_vec()),
            ("0x00FF", vec![0, 0xff]),
            ("0Xab", vec![0xab]),
            ("  DeadBeef\n", vec![0xde, 0xad, 0xbe, 0xef]),
            (&"ab".repeat(64), vec![0xab; 64]),
        ] {
            assert_eq!(parse_psk_hex(text).unwrap(), want, "{text:?}");
        }
        for bad in [
            String::new(),
            "  \n".into(),
            "0x".into(),
            "abc".into(),
            "zz".into(),
            "+1".into(),
            "ab cd".into(),
            "0xx12".into(),
            "éa".into(),
            "ab".repeat(65),
        ] {
            let err = parse_psk_hex(&bad).unwrap_err();
            assert!(matches!(err, RegistryError::BadPskKey(_)), "{bad:?}");
        }
        let msg = parse_psk_hex("c0ffee1").unwrap_err().to_string();
        assert!(
            !msg.contains("c0ffee"),
            "an error never quotes the key: {msg}"
        );
    }

    #[test]
    fn a_v5_state_db_opens_with_its_devices_and_takes_psks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        let tok = RegistryDb::open(&p).unwrap().add("old", "t", None).unwrap();
        Connection::open(&p)
            .unwrap()
            .execute_batch(
                "DROP INDEX devices_psk_identity;
                 ALTER TABLE devices DROP COLUMN psk_key;
                 ALTER TABLE devices DROP COLUMN psk_identity;
                 PRAGMA user_version = 5;",
            )
            .unwrap();
        let db = RegistryDb::open(&p).unwrap();
        let old = db.show("old").unwrap();
        assert_eq!((old.revoked, old.psk_identity), (false, None));
        db.set_psk("old", Some("id-old"), b"k").unwrap();
        let reg = Registry::load(&p).unwrap();
        assert_eq!(reg.authenticate(&tok).unwrap().as_str(), "old");
        assert_eq!(reg.psk_lookup(b"id-old").unwrap().0.as_str(), "old");
    }

    fn configured(name: &str, token: &str) -> ConfigDevice {
        ConfigDevice {
            name: name.into(),
            kind: "sensor".into(),
            token_sha256: token_hash(token),
            cert_sha256: None,
            bridge_for: None,
        }
    }

    #[test]
    fn configured_devices_are_added_updated_and_revoked_but_cli_devices_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        let db = RegistryDb::open(&p).unwrap();
        db.add("cli-1", "t", Some("cli-token")).unwrap();
        let r = db
            .provision(&[configured("cfg-1", "tok-1"), configured("cfg-2", "tok-2")])
            .unwrap();
        assert_eq!(r.added, ["cfg-1", "cfg-2"]);
        let reg = Registry::load(&p).unwrap();
        assert_eq!(reg.authenticate("tok-1").unwrap().as_str(), "cfg-1");
        assert_eq!(
            reg.device_type(&DeviceName::new("cfg-1")).unwrap(),
            "sensor"
        );
        assert_eq!(db.show("cfg-1").unwrap().source, "config");
        assert_eq!(db.show("cli-1").unwrap().source, "cli");

        // The same list again changes nothing.
        assert_eq!(
            db.provision(&[configured("cfg-1", "tok-1"), configured("cfg-2", "tok-2")])
                .unwrap(),
            ProvisionReport::default()
        );

        // cfg-1 gets a new token and a bridge glob, cfg-2 is dropped.
        let mut changed = configured("cfg-1", "tok-1b");
        changed.bridge_for = Some("room-*".into());
        let r = db.provision(std::slice::from_ref(&changed)).unwrap();
        assert_eq!(
            (r.updated, r.revoked),
            (vec!["cfg-1".to_owned()], vec!["cfg-2".to_owned()])
        );
        reg.reload().unwrap();
        assert!(reg.authenticate("tok-1").is_none());
        assert_eq!(reg.authenticate("tok-1b").unwrap().as_str(), "cfg-1");
        assert!(reg.may_speak_for(&DeviceName::new("cfg-1"), "room-3"));
        assert!(reg.authenticate("tok-2").is_none());
        assert!(db.show("cfg-2").unwrap().revoked, "revoked, not deleted");
        assert_eq!(reg.authenticate("cli-token").unwrap().as_str(), "cli-1");

        // Listed again, cfg-2 comes back; an empty list revokes every
        // configured device and no CLI one.
        let r = db
            .provision(&[changed, configured("cfg-2", "tok-2")])
            .unwrap();
        assert_eq!(r.updated, ["cfg-2"]);
        let r = db.provision(&[]).unwrap();
        assert_eq!(r.revoked, ["cfg-1", "cfg-2"]);
        assert!(!db.show("cli-1").unwrap().revoked);
    }

    #[test]
    fn a_configured_name_or_credential_held_by_a_cli_device_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        let db = RegistryDb::open(&p).unwrap();
        db.add("cli-1", "t", Some("cli-token")).unwrap();
        let r = db
            .provision(&[
                configured("cli-1", "other"),
                configured("cfg-1", "cli-token"),
                configured("cfg-2", "tok-2"),
            ])
            .unwrap();
        assert_eq!(r.added, ["cfg-2"]);
        let skipped: Vec<&str> = r.skipped.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(skipped, ["cli-1", "cfg-1"]);
        let cli = db.show("cli-1").unwrap();
        assert_eq!((cli.kind.as_str(), cli.source.as_str()), ("t", "cli"));
        let reg = Registry::load(&p).unwrap();
        assert_eq!(reg.authenticate("cli-token").unwrap().as_str(), "cli-1");
        assert!(reg.authenticate("other").is_none());
    }

    #[test]
    fn configured_devices_can_swap_tokens_and_pass_a_token_on_by_rename() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        let db = RegistryDb::open(&p).unwrap();
        db.provision(&[configured("a", "tok-a"), configured("b", "tok-b")])
            .unwrap();
        let r = db
            .provision(&[configured("a", "tok-b"), configured("b", "tok-a")])
            .unwrap();
        assert_eq!(r.updated, ["a", "b"]);
        let reg = Registry::load(&p).unwrap();
        assert_eq!(reg.authenticate("tok-a").unwrap().as_str(), "b");
        assert_eq!(reg.authenticate("tok-b").unwrap().as_str(), "a");
        // "b" renamed to "c", same token.
        let r = db
            .provision(&[configured("a", "tok-b"), configured("c", "tok-a")])
            .unwrap();
        assert_eq!(
            (r.added, r.revoked),
            (vec!["c".to_owned()], vec!["b".to_owned()])
        );
        reg.reload().unwrap();
        assert_eq!(reg.authenticate("tok-a").unwrap().as_str(), "c");
    }

    #[test]
    fn a_device_can_be_added_by_token_hash() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        let db = RegistryDb::open(&p).unwrap();
        db.add_hashed(&configured("h", "hashed-token"), false)
            .unwrap();
        assert!(matches!(
            db.add_hashed(&configured("h", "x"), false),
            Err(RegistryError::Exists(_))
        ));
        assert!(matches!(
            db.add_hashed(&configured("h2", "hashed-token"), false),
            Err(RegistryError::TokenInUse)
        ));
        let reg = Registry::load(&p).unwrap();
        assert_eq!(reg.authenticate("hashed-token").unwrap().as_str(), "h");
        assert_eq!(db.show("h").unwrap().source, "cli");
    }

    #[test]
    fn tokens_are_stored_only_as_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        RegistryDb::open(&p)
            .unwrap()
            .add("d", "t", Some("super-secret-token"))
            .unwrap();
        drop(RegistryDb::open(&p).unwrap());
        let needle = b"super-secret-token";
        for f in ["state.db", "state.db-wal"] {
            let bytes = std::fs::read(dir.path().join(f)).unwrap_or_default();
            assert!(!bytes.windows(needle.len()).any(|w| w == needle), "{f}");
        }
    }
}
