//! Signed fleet configuration pushed from the cloud (`P/config`, retained).
//!
//! Envelope (DESIGN.md): `{"payload":"<base64>","signature":"<base64
//! Ed25519 over the payload bytes>","key_id":"…"}`; the payload is
//! `{"version":N,"config":{…the TOML's keys…}}`. Keys are raw 32-byte
//! Ed25519 keys in standard base64; `key_id` is advisory (every key in
//! `fleet.trusted_keys` is tried). `sluice fleet keygen OUT` writes OUT (the
//! private seed, mode 0600) and OUT.pub; `sluice fleet sign --key OUT FILE`
//! prints the envelope of FILE's bytes.
//!
//! A configuration is applied only if the signature verifies, its version
//! is higher than every version seen before (anti-rollback; the same
//! version as the applied one re-reports `applied`, a retained message after
//! a reconnect), it sets no local-only key (`gateway.state_dir`, `admin.*`,
//! `fleet.*`: the local file always wins there), and the configuration it
//! makes — the files, this layer over them, the environment over that —
//! passes the same validator as a file. It is then persisted atomically
//! (`state_dir/fleet/applied.json`, the one it replaces kept as
//! `previous.json`; temp file + fsync + rename) and applied: a change of
//! `[[rules]]` only is swapped into the pipeline in place; anything else by
//! a supervised in-process restart of the daemon (listeners, outbox, uplink
//! are rebuilt from the new configuration; the process and its PID stay). If the uplink
//! is not connected within `fleet.confirm_timeout` after that, the previous
//! configuration is put back and the daemon restarts again with it
//! (`rolled_back`). Every outcome is reported on `P/config/state` (retained):
//! `{"version":N,"status":"applied"|"rejected"|"rolled_back","error":…}`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Keys a fleet configuration may not set: the local file wins there.
pub const LOCAL_ONLY: [&str; 3] = ["gateway.state_dir", "admin", "fleet"];

/// Why a fleet operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The envelope is not JSON of the right shape.
    #[error("envelope: {0}")]
    Envelope(String),
    /// No trusted key verifies the signature.
    #[error("signature does not verify against any key in fleet.trusted_keys")]
    Signature,
    /// The payload is not `{"version":N,"config":{…}}`.
    #[error("payload: {0}")]
    Payload(String),
    /// A key file could not be used.
    #[error("{path}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Reading or writing the state dir failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    payload: String,
    signature: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
}

/// A verified payload.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetPayload {
    /// Its version.
    pub version: u64,
    /// The `config` object.
    pub config: Json,
}

/// Writes a new key pair: `out` (the 32-byte seed, base64, mode 0600) and
/// `out.pub` (the public key, base64); returns the public key.
///
/// Fails when the random source or the files fail, or `out` exists.
pub fn keygen(out: &Path) -> Result<String, FleetError> {
    let key_err = |m: String| FleetError::Key {
        path: out.to_owned(),
        message: m,
    };
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| key_err(e.to_string()))?;
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|e| key_err(e.to_string()))?;
    let public = B64.encode(pair.public_key().as_ref());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| key_err(format!("cannot create the key file: {e}")))?;
    writeln!(f, "{}", B64.encode(seed)).map_err(|e| key_err(e.to_string()))?;
    let pub_path = PathBuf::from(format!("{}.pub", out.display()));
    std::fs::write(&pub_path, format!("{public}\n")).map_err(|e| FleetError::Io {
        path: pub_path,
        source: e,
    })?;
    Ok(public)
}

/// The envelope of `payload` signed with the private key in `key_file`.
///
/// Fails when the key file is unreadable or not a key.
pub fn sign(key_file: &Path, payload: &[u8]) -> Result<String, FleetError> {
    let key_err = |m: String| FleetError::Key {
        path: key_file.to_owned(),
        message: m,
    };
    let text = std::fs::read_to_string(key_file).map_err(|e| key_err(e.to_string()))?;
    let seed = B64
        .decode(text.trim())
        .ok()
        .filter(|s| s.len() == 32)
        .ok_or_else(|| key_err("not a base64 32-byte Ed25519 private key".into()))?;
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|e| key_err(e.to_string()))?;
    let env = Envelope {
        payload: B64.encode(payload),
        signature: B64.encode(pair.sign(payload).as_ref()),
        key_id: Some(B64.encode(&pair.public_key().as_ref()[..8])),
    };
    serde_json::to_string(&env).map_err(|e| key_err(e.to_string()))
}

/// Verifies `envelope` against `trusted` and parses its payload.
///
/// Fails on a malformed envelope, a signature no trusted key verifies, or
/// a payload that is not `{"version":N,"config":{…}}`.
pub fn verify(envelope: &[u8], trusted: &[[u8; 32]]) -> Result<FleetPayload, FleetError> {
    let payload = open(envelope, trusted)?;
    let v: Json =
        serde_json::from_slice(&payload).map_err(|e| FleetError::Payload(e.to_string()))?;
    let version = v
        .get("version")
        .and_then(Json::as_u64)
        .filter(|n| *n > 0)
        .ok_or_else(|| FleetError::Payload("\"version\" must be a positive integer".into()))?;
    let config = match v.get("config") {
        Some(c @ Json::Object(_)) => c.clone(),
        _ => return Err(FleetError::Payload("\"config\" must be an object".into())),
    };
    Ok(FleetPayload { version, config })
}

/// Opens a signed envelope (`{"payload","signature","key_id"}`): the
/// payload bytes when a `trusted` key verifies the signature over them.
/// Fleet configurations and firmware manifests travel in the same
/// envelope.
///
/// Fails on a malformed envelope or a signature no trusted key verifies.
pub fn open(envelope: &[u8], trusted: &[[u8; 32]]) -> Result<Vec<u8>, FleetError> {
    let env: Envelope =
        serde_json::from_slice(envelope).map_err(|e| FleetError::Envelope(e.to_string()))?;
    let payload = B64
        .decode(env.payload.trim())
        .map_err(|e| FleetError::Envelope(format!("payload is not base64: {e}")))?;
    let sig = B64
        .decode(env.signature.trim())
        .map_err(|e| FleetError::Envelope(format!("signature is not base64: {e}")))?;
    if !trusted.iter().any(|k| {
        UnparsedPublicKey::new(&ED25519, k)
            .verify(&payload, &sig)
            .is_ok()
    }) {
        return Err(FleetError::Signature);
    }
    Ok(payload)
}

/// The version of an envelope's payload without verifying it (for the
/// rejection report of a bad signature).
pub fn claimed_version(envelope: &[u8]) -> Option<u64> {
    let env: Envelope = serde_json::from_slice(envelope).ok()?;
    let payload = B64.decode(env.payload.trim()).ok()?;
    serde_json::from_slice::<Json>(&payload)
        .ok()?
        .get("version")?
        .as_u64()
}

/// The first local-only key `config` sets, if any.
pub fn local_only_key(config: &Json) -> Option<String> {
    for key in LOCAL_ONLY {
        let mut node = config;
        let mut found = true;
        for part in key.split('.') {
            match node.get(part) {
                Some(n) => node = n,
                None => {
                    found = false;
                    break;
                }
            }
        }
        if found {
            return Some(key.to_owned());
        }
    }
    None
}

/// What the gateway remembers about fleet configuration
/// (`state_dir/fleet/state.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetState {
    /// The highest version ever accepted for applying (anti-rollback).
    pub highest_seen: u64,
    /// The version in force and confirmed (0 = none).
    pub applied: u64,
    /// A version applied but not yet confirmed by a connected uplink.
    pub pending: Option<u64>,
    /// The last report, re-published at start (retained topic).
    pub report: Option<Json>,
    /// The last version rolled back (its retained envelope, delivered
    /// again after the roll-back, re-reports `rolled_back`).
    #[serde(default)]
    pub rolled_back: Option<u64>,
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("fleet")
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync
/// of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FleetError> {
    let io = |source| FleetError::Io {
        path: path.to_owned(),
        source,
    };
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// The fleet state (default when none was stored).
pub fn load_state(state_dir: &Path) -> FleetState {
    std::fs::read(dir(state_dir).join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Persists the fleet state.
///
/// Fails when the write fails.
pub fn save_state(state_dir: &Path, st: &FleetState) -> Result<(), FleetError> {
    let bytes = serde_json::to_vec_pretty(st).map_err(|e| FleetError::Payload(e.to_string()))?;
    write_atomic(&dir(state_dir).join("state.json"), &bytes)
}

/// The applied fleet configuration layer (version, `config` as JSON text).
pub fn applied(state_dir: &Path) -> Option<(u64, String)> {
    let v: Json =
        serde_json::from_slice(&std::fs::read(dir(state_dir).join("applied.json")).ok()?).ok()?;
    Some((v.get("version")?.as_u64()?, v.get("config")?.to_string()))
}

/// Makes `p` the applied layer, keeping the current one as `previous.json`.
///
/// Fails when a write fails (the applied layer is unchanged then).
pub fn install(state_dir: &Path, p: &FleetPayload) -> Result<(), FleetError> {
    let d = dir(state_dir);
    let current = d.join("applied.json");
    let previous = d.join("previous.json");
    match std::fs::read(&current) {
        Ok(bytes) => write_atomic(&previous, &bytes)?,
        Err(_) => {
            let _ = std::fs::remove_file(&previous);
        }
    }
    let bytes = serde_json::to_vec_pretty(&json!({"version": p.version, "config": p.config}))
        .map_err(|e| FleetError::Payload(e.to_string()))?;
    write_atomic(&current, &bytes)
}

/// Puts the previous layer back (none, if there was none before).
///
/// Fails when a write fails.
pub fn roll_back(state_dir: &Path) -> Result<(), FleetError> {
    let d = dir(state_dir);
    let current = d.join("applied.json");
    match std::fs::read(d.join("previous.json")) {
        Ok(bytes) => write_atomic(&current, &bytes),
        Err(_) => match std::fs::remove_file(&current) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(FleetError::Io {
                path: current,
                source,
            }),
        },
    }
}

/// A `P/config/state` report.
pub fn report(version: Option<u64>, status: &str, error: Option<&str>) -> Json {
    json!({"version": version, "status": status, "error": error})
}

/// What the fleet task needs from the daemon.
pub struct FleetTask {
    /// The state dir.
    pub state_dir: PathBuf,
    /// The config file (the merged configuration is validated from it).
    pub source: PathBuf,
    /// `[fleet]`.
    pub config: crate::config::FleetConfig,
    /// Whether the uplink is connected (`None`: no cloud; confirm at once).
    pub uplink: Option<std::sync::Arc<sluice_cloud_sync::UplinkStatus>>,
    /// Where reports go.
    pub router: std::sync::Arc<crate::downlink::Router>,
    /// Fired to restart the daemon with the configuration on disk.
    pub restart: tokio_util::sync::CancellationToken,
    /// Where a rules-only change is applied in place.
    pub pipeline: std::sync::Arc<crate::pipeline::Pipeline>,
}

/// What to do with an envelope, given the fleet state.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Install it and restart.
    Apply(FleetPayload),
    /// Report this and change nothing.
    Report(Json),
    /// Nothing (the version is being confirmed).
    Ignore,
}

/// Decides about `envelope` (no I/O but the validation of the merged
/// configuration, done by `validate`).
pub fn decide(
    envelope: &[u8],
    keys: &[[u8; 32]],
    st: &FleetState,
    validate: impl FnOnce(&Json) -> Result<(), String>,
) -> Decision {
    let p = match verify(envelope, keys) {
        Ok(p) => p,
        Err(e) => {
            return Decision::Report(report(
                claimed_version(envelope),
                "rejected",
                Some(&e.to_string()),
            ));
        }
    };
    let v = Some(p.version);
    if st.pending == v {
        return Decision::Ignore;
    }
    if p.version == st.applied {
        return Decision::Report(report(v, "applied", None));
    }
    if st.rolled_back == v {
        return Decision::Report(report(
            v,
            "rolled_back",
            Some("this version was rolled back; send a higher version"),
        ));
    }
    if p.version <= st.highest_seen {
        return Decision::Report(report(
            v,
            "rejected",
            Some(&format!(
                "version {} is not newer than {} (replay?)",
                p.version, st.highest_seen
            )),
        ));
    }
    if let Some(key) = local_only_key(&p.config) {
        return Decision::Report(report(
            v,
            "rejected",
            Some(&format!(
                "{key} is local-only: the gateway's own file sets it"
            )),
        ));
    }
    if let Err(e) = validate(&p.config) {
        return Decision::Report(report(v, "rejected", Some(&e)));
    }
    Decision::Apply(p)
}

impl FleetTask {
    fn publish(&self, st: &mut FleetState, r: Json) {
        tracing::info!(report = %r, "fleet configuration");
        self.router
            .up(sluice_cloud_sync::downlink::UpMessage::ConfigState(
                r.to_string().into_bytes(),
            ));
        st.report = Some(r);
        if let Err(e) = save_state(&self.state_dir, st) {
            tracing::error!(error = %e, "cannot save the fleet state");
        }
    }

    /// Handles envelopes until `cancel`; confirms or rolls back a pending
    /// version.
    pub async fn run(
        self,
        mut envelopes: tokio::sync::mpsc::Receiver<Vec<u8>>,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let mut st = load_state(&self.state_dir);
        if let Some(r) = &st.report {
            self.router
                .up(sluice_cloud_sync::downlink::UpMessage::ConfigState(
                    r.to_string().into_bytes(),
                ));
        }
        let started = tokio::time::Instant::now();
        let mut check = tokio::time::interval(std::time::Duration::from_millis(200));
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                e = envelopes.recv() => {
                    let Some(envelope) = e else { break };
                    let source = self.source.clone();
                    let decision = decide(&envelope, &self.config.trusted_keys, &st, |config| {
                        crate::config::load_with_fleet(&source, &config.to_string())
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    });
                    match decision {
                        Decision::Ignore => {}
                        Decision::Report(r) => self.publish(&mut st, r),
                        Decision::Apply(p) => {
                            // Rules only: swap them in place, nothing restarts.
                            let current = applied(&self.state_dir).map(|(_, json)| json);
                            let hot = crate::config::rules_only_change(
                                &self.source,
                                current.as_deref(),
                                &p.config.to_string(),
                            )
                            .ok()
                            .flatten();
                            if let Some(rules) = hot {
                                if let Err(e) = install(&self.state_dir, &p) {
                                    let r = report(Some(p.version), "rejected", Some(&e.to_string()));
                                    self.publish(&mut st, r);
                                    continue;
                                }
                                self.pipeline.set_rules(rules).await;
                                st.highest_seen = p.version;
                                st.applied = p.version;
                                st.pending = None;
                                tracing::info!(version = p.version, "fleet configuration applied in place (rules only)");
                                self.publish(&mut st, report(Some(p.version), "applied", None));
                                continue;
                            }
                            if let Err(e) = install(&self.state_dir, &p) {
                                let r = report(Some(p.version), "rejected", Some(&e.to_string()));
                                self.publish(&mut st, r);
                                continue;
                            }
                            st.highest_seen = p.version;
                            st.pending = Some(p.version);
                            st.report = None;
                            if let Err(e) = save_state(&self.state_dir, &st) {
                                tracing::error!(error = %e, "cannot save the fleet state");
                            }
                            tracing::info!(version = p.version, "fleet configuration installed; restarting to apply it");
                            self.restart.cancel();
                            break;
                        }
                    }
                }
                _ = check.tick(), if st.pending.is_some() => {
                    let Some(v) = st.pending else { continue };
                    let connected = self.uplink.as_ref().is_none_or(|u| u.connected());
                    if connected {
                        st.applied = v;
                        st.pending = None;
                        self.publish(&mut st, report(Some(v), "applied", None));
                    } else if started.elapsed() >= self.config.confirm_timeout {
                        let why = format!(
                            "the uplink did not connect within fleet.confirm_timeout ({} s)",
                            self.config.confirm_timeout.as_secs()
                        );
                        if let Err(e) = roll_back(&self.state_dir) {
                            tracing::error!(error = %e, "cannot roll the fleet configuration back");
                        }
                        st.pending = None;
                        st.rolled_back = Some(v);
                        self.publish(&mut st, report(Some(v), "rolled_back", Some(&why)));
                        tracing::warn!(version = v, "fleet configuration rolled back; restarting");
                        self.restart.cancel();
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path) -> (PathBuf, [u8; 32]) {
        let key = dir.join("k");
        let public = keygen(&key).unwrap();
        let pk: [u8; 32] = B64.decode(public).unwrap().try_into().unwrap();
        (key, pk)
    }

    #[test]
    fn signed_payloads_verify_and_tampering_or_strangers_do_not() {
        let d = tempfile::tempdir().unwrap();
        let (key, pk) = pair(d.path());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let payload = br#"{"version":3,"config":{"outbox":{"max_bytes":"1MiB"}}}"#;
        let env = sign(&key, payload).unwrap();
        let p = verify(env.as_bytes(), &[pk]).unwrap();
        assert_eq!(p.version, 3);
        assert_eq!(p.config["outbox"]["max_bytes"], "1MiB");
        // Tampered payload, same signature.
        let mut e: Json = serde_json::from_str(&env).unwrap();
        e["payload"] =
            json!(B64.encode(br#"{"version":3,"config":{"outbox":{"max_bytes":"2MiB"}}}"#));
        assert!(matches!(
            verify(e.to_string().as_bytes(), &[pk]),
            Err(FleetError::Signature)
        ));
        // Another key.
        let (_, other) = pair(&d.path().join("x").tap_mkdir());
        assert!(matches!(
            verify(env.as_bytes(), &[other]),
            Err(FleetError::Signature)
        ));
        assert!(
            verify(env.as_bytes(), &[other, pk]).is_ok(),
            "every key is tried"
        );
        assert_eq!(claimed_version(env.as_bytes()), Some(3));
        assert!(matches!(verify(b"{", &[pk]), Err(FleetError::Envelope(_))));
        let bad = sign(&key, br#"{"version":0,"config":{}}"#).unwrap();
        assert!(matches!(
            verify(bad.as_bytes(), &[pk]),
            Err(FleetError::Payload(_))
        ));
    }

    trait Mkdir {
        fn tap_mkdir(self) -> Self;
    }
    impl Mkdir for PathBuf {
        fn tap_mkdir(self) -> Self {
            std::fs::create_dir_all(&self).unwrap();
            self
        }
    }

    #[test]
    fn local_only_keys_are_found() {
        assert_eq!(
            local_only_key(&json!({"gateway": {"state_dir": "/x"}})),
            Some("gateway.state_dir".into())
        );
        assert_eq!(local_only_key(&json!({"fleet": {}})), Some("fleet".into()));
        assert_eq!(local_only_key(&json!({"gateway": {"id": "g"}})), None);
    }

    #[test]
    fn install_and_roll_back_keep_one_previous_layer() {
        let d = tempfile::tempdir().unwrap();
        assert!(applied(d.path()).is_none());
        let p = |v| FleetPayload {
            version: v,
            config: json!({"log": {"level": format!("v{v}")}}),
        };
        install(d.path(), &p(1)).unwrap();
        install(d.path(), &p(2)).unwrap();
        assert_eq!(applied(d.path()).unwrap().0, 2);
        roll_back(d.path()).unwrap();
        assert_eq!(applied(d.path()).unwrap().0, 1);
        let st = FleetState {
            highest_seen: 2,
            applied: 1,
            pending: None,
            report: Some(report(Some(2), "rolled_back", Some("x"))),
            rolled_back: Some(2),
        };
        save_state(d.path(), &st).unwrap();
        assert_eq!(load_state(d.path()), st);
        // With no previous layer, a roll-back leaves none.
        let e = tempfile::tempdir().unwrap();
        install(e.path(), &p(5)).unwrap();
        roll_back(e.path()).unwrap();
        assert!(applied(e.path()).is_none());
    }
}

#[cfg(test)]
mod decide_tests {
    use super::*;

    fn keyed() -> (tempfile::TempDir, PathBuf, [u8; 32]) {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("k");
        let pk: [u8; 32] = B64
            .decode(keygen(&key).unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        (d, key, pk)
    }

    fn env(key: &Path, v: u64, config: Json) -> Vec<u8> {
        sign(
            key,
            json!({"version": v, "config": config})
                .to_string()
                .as_bytes(),
        )
        .unwrap()
        .into_bytes()
    }

    fn status(d: &Decision) -> (Option<u64>, String) {
        match d {
            Decision::Report(r) => (
                r["version"].as_u64(),
                r["status"].as_str().unwrap().to_owned(),
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn versions_only_move_forward_and_repeats_re_report() {
        let (_d, key, pk) = keyed();
        let ok = |_: &Json| Ok(());
        let st = FleetState {
            highest_seen: 5,
            applied: 5,
            ..FleetState::default()
        };
        assert!(matches!(
            decide(&env(&key, 6, json!({})), &[pk], &st, ok),
            Decision::Apply(p) if p.version == 6
        ));
        assert_eq!(
            status(&decide(&env(&key, 5, json!({})), &[pk], &st, ok)),
            (Some(5), "applied".into())
        );
        assert_eq!(
            status(&decide(&env(&key, 4, json!({})), &[pk], &st, ok)),
            (Some(4), "rejected".into())
        );
        let pending = FleetState {
            pending: Some(6),
            ..st.clone()
        };
        assert_eq!(
            decide(&env(&key, 6, json!({})), &[pk], &pending, ok),
            Decision::Ignore
        );
        let rolled = FleetState {
            highest_seen: 6,
            rolled_back: Some(6),
            ..st.clone()
        };
        assert_eq!(
            status(&decide(&env(&key, 6, json!({})), &[pk], &rolled, ok)),
            (Some(6), "rolled_back".into())
        );
    }

    #[test]
    fn bad_signatures_local_only_keys_and_invalid_configs_are_rejected() {
        let (_d, key, pk) = keyed();
        let (_e, other, _) = keyed();
        let st = FleetState::default();
        let ok = |_: &Json| Ok(());
        let r = decide(&env(&other, 1, json!({})), &[pk], &st, ok);
        assert_eq!(status(&r), (Some(1), "rejected".into()));
        let r = decide(
            &env(&key, 1, json!({"gateway": {"state_dir": "/tmp"}})),
            &[pk],
            &st,
            ok,
        );
        assert_eq!(status(&r), (Some(1), "rejected".into()));
        let r = decide(
            &env(&key, 1, json!({"outbox": {"max_bytes": "12XB"}})),
            &[pk],
            &st,
            |_| Err("outbox.max_bytes: bad".into()),
        );
        match r {
            Decision::Report(r) => assert_eq!(r["error"], "outbox.max_bytes: bad"),
            other => panic!("{other:?}"),
        }
    }
}
