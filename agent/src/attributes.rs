//! Device attributes as the ThingsBoard device API knows them: **client**
//! attributes a device reports about itself (`v1/devices/me/attributes`
//! upstream) and **shared** attributes set for it from outside (the cloud's
//! `P/attributes/shared`, a firmware campaign's `fw_*`), which the device
//! reads with an attribute request or receives as a push.
//!
//! The daemon keeps every device's attributes in memory (fleets behind one
//! gateway are small) and writes changes through to `state.db`'s
//! `attributes` table from one writer thread, in the order they were made,
//! so reads never touch SQLite and no listener waits for an fsync. The CLI
//! writes `state.db` directly (firmware staging) and then asks the daemon to
//! [`AttributeStore::reload`] the devices it touched.
//!
//! The images staged for firmware campaigns are indexed here too
//! (`firmware_images`): a device may fetch exactly the image its shared
//! `fw_title` / `fw_version` name.

use rusqlite::{Connection, params};
use serde_json::{Map, Value as Json};
use sluice_cloud_sync::{DeviceName, statedb};
use sluice_firmware::Image;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, mpsc};
use std::time::{SystemTime, UNIX_EPOCH};

/// Attribute scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Reported by the device.
    Client,
    /// Set for the device.
    Shared,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Shared => "shared",
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Scopes {
    client: Map<String, Json>,
    shared: Map<String, Json>,
}

enum Write {
    /// Set (`Some`) or delete (`None`) one key.
    Key {
        device: String,
        scope: Scope,
        key: String,
        value: Option<String>,
    },
    /// Answer once everything before it is written.
    Flush(mpsc::SyncSender<()>),
}

/// Why the store could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AttributeError {
    /// state.db could not be opened.
    #[error(transparent)]
    State(#[from] statedb::StateDbError),
    /// A query failed.
    #[error("attributes in {path}: {source}")]
    Sqlite {
        /// state.db.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
}

/// Shared attributes of one device that changed: (device, keys set with
/// their values, keys deleted).
pub type SharedChange = (DeviceName, Map<String, Json>, Vec<String>);

/// The in-memory attributes with write-through to `state.db`.
pub struct AttributeStore {
    path: PathBuf,
    firmware_root: PathBuf,
    cache: RwLock<HashMap<DeviceName, Scopes>>,
    images: RwLock<HashMap<(String, String), Image>>,
    writer: Mutex<Option<mpsc::SyncSender<Write>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

type Loaded = (
    HashMap<DeviceName, Scopes>,
    HashMap<(String, String), Image>,
);

fn load_all(conn: &Connection, devices: Option<&[DeviceName]>) -> rusqlite::Result<Loaded> {
    let mut cache: HashMap<DeviceName, Scopes> = HashMap::new();
    let mut stmt =
        conn.prepare("SELECT device, scope, key, value FROM attributes ORDER BY device, key")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
        ))
    })?;
    for row in rows {
        let (device, scope, key, value) = row?;
        let device = DeviceName::new(&device);
        if devices.is_some_and(|d| !d.contains(&device)) {
            continue;
        }
        // A value that is not JSON (edited by hand) is kept as a string.
        let value = serde_json::from_str(&value).unwrap_or(Json::String(value));
        let entry = cache.entry(device).or_default();
        match scope.as_str() {
            "client" => entry.client.insert(key, value),
            _ => entry.shared.insert(key, value),
        };
    }
    let mut images = HashMap::new();
    let mut stmt =
        conn.prepare("SELECT title, version, size, sha256, file FROM firmware_images")?;
    let rows = stmt.query_map([], |r| {
        Ok(Image {
            title: r.get(0)?,
            version: r.get(1)?,
            size: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
            sha256: r.get(3)?,
            path: PathBuf::from(r.get::<_, String>(4)?),
        })
    })?;
    for img in rows {
        let img = img?;
        images.insert((img.title.clone(), img.version.clone()), img);
    }
    Ok((cache, images))
}

fn write_one(conn: &Connection, w: &Write) -> rusqlite::Result<()> {
    if let Write::Key {
        device,
        scope,
        key,
        value,
    } = w
    {
        match value {
            Some(v) => conn.execute(
                "INSERT INTO attributes (device, scope, key, value, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (device, scope, key) DO UPDATE SET value = excluded.value, updated_ms = excluded.updated_ms",
                params![device, scope.as_str(), key, v, now_ms()],
            )?,
            None => conn.execute(
                "DELETE FROM attributes WHERE device = ?1 AND scope = ?2 AND key = ?3",
                params![device, scope.as_str(), key],
            )?,
        };
    }
    Ok(())
}

/// The writer thread: applies writes in order, a burst per transaction.
fn writer(conn: Connection, rx: mpsc::Receiver<Write>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
            if batch.len() >= 1000 {
                break;
            }
        }
        let result = (|| -> rusqlite::Result<()> {
            let tx = conn.unchecked_transaction()?;
            for w in &batch {
                write_one(&tx, w)?;
            }
            tx.commit()
        })();
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot write device attributes to state.db; they stay in memory");
        }
        for w in batch {
            if let Write::Flush(done) = w {
                let _ = done.send(());
            }
        }
    }
}

impl AttributeStore {
    /// Loads every device's attributes and the firmware index from
    /// `state_db`, and starts the writer thread. Images are served from
    /// `firmware_root/ready/`.
    ///
    /// Fails when state.db cannot be opened or read.
    pub fn load(state_db: &Path, firmware_root: &Path) -> Result<Self, AttributeError> {
        let sql = |source| AttributeError::Sqlite {
            path: state_db.to_owned(),
            source,
        };
        let conn = statedb::open(state_db)?;
        let (cache, images) = load_all(&conn, None).map_err(sql)?;
        let (tx, rx) = mpsc::sync_channel(4096);
        let thread = std::thread::Builder::new()
            .name("attr-writer".into())
            .spawn(move || writer(conn, rx))
            .map_err(|e| AttributeError::Sqlite {
                path: state_db.to_owned(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok(Self {
            path: state_db.to_owned(),
            firmware_root: firmware_root.to_owned(),
            cache: RwLock::new(cache),
            images: RwLock::new(images),
            writer: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    fn persist(&self, w: Write) {
        let sender = self.writer.lock().ok().and_then(|g| g.clone());
        match sender {
            Some(s) => {
                if s.send(w).is_err() {
                    tracing::error!("attribute writer is gone; a change stays in memory only");
                }
            }
            None => tracing::warn!("attribute store closed; a change stays in memory only"),
        }
    }

    /// Records client attributes `device` reported (merged over the earlier
    /// ones).
    pub fn set_client(&self, device: &DeviceName, values: &Map<String, Json>) {
        if let Ok(mut g) = self.cache.write() {
            let e = g.entry(device.clone()).or_default();
            for (k, v) in values {
                e.client.insert(k.clone(), v.clone());
            }
        }
        for (k, v) in values {
            self.persist(Write::Key {
                device: device.as_str().to_owned(),
                scope: Scope::Client,
                key: k.clone(),
                value: Some(v.to_string()),
            });
        }
    }

    /// Sets shared attributes of `device`; a `null` value deletes the key.
    /// Returns what changed: the keys set (with values) and the keys deleted.
    pub fn set_shared(
        &self,
        device: &DeviceName,
        values: &Map<String, Json>,
    ) -> (Map<String, Json>, Vec<String>) {
        let mut set = Map::new();
        let mut deleted = Vec::new();
        if let Ok(mut g) = self.cache.write() {
            let e = g.entry(device.clone()).or_default();
            for (k, v) in values {
                if v.is_null() {
                    if e.shared.remove(k).is_some() {
                        deleted.push(k.clone());
                    }
                } else {
                    e.shared.insert(k.clone(), v.clone());
                    set.insert(k.clone(), v.clone());
                }
            }
        }
        for (k, v) in values {
            self.persist(Write::Key {
                device: device.as_str().to_owned(),
                scope: Scope::Shared,
                key: k.clone(),
                value: (!v.is_null()).then(|| v.to_string()),
            });
        }
        (set, deleted)
    }

    /// The answer to an attribute request: `{"client":{…},"shared":{…}}`
    /// with the keys asked for that exist; a scope not asked for is left
    /// out, and a request naming no keys at all gets every attribute of both
    /// scopes (as ThingsBoard does).
    pub fn request(
        &self,
        device: &DeviceName,
        client_keys: Option<&[String]>,
        shared_keys: Option<&[String]>,
    ) -> Json {
        let scopes = self
            .cache
            .read()
            .ok()
            .and_then(|g| g.get(device).cloned())
            .unwrap_or_default();
        let pick = |m: &Map<String, Json>, keys: Option<&[String]>| -> Map<String, Json> {
            match keys {
                None => m.clone(),
                Some(keys) => keys
                    .iter()
                    .filter_map(|k| m.get(k).map(|v| (k.clone(), v.clone())))
                    .collect(),
            }
        };
        let mut out = Map::new();
        let all = client_keys.is_none() && shared_keys.is_none();
        if all || client_keys.is_some() {
            out.insert(
                "client".into(),
                Json::Object(pick(&scopes.client, client_keys)),
            );
        }
        if all || shared_keys.is_some() {
            out.insert(
                "shared".into(),
                Json::Object(pick(&scopes.shared, shared_keys)),
            );
        }
        Json::Object(out)
    }

    /// The firmware image `device` may fetch: the staged image named by its
    /// shared `fw_title` and `fw_version`, if both are set and staged.
    pub fn firmware_for(&self, device: &DeviceName) -> Option<Image> {
        let (title, version) = {
            let g = self.cache.read().ok()?;
            let shared = &g.get(device)?.shared;
            let s = |k: &str| match shared.get(k)? {
                Json::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            };
            (s("fw_title")?, s("fw_version")?)
        };
        let img = self.images.read().ok()?.get(&(title, version))?.clone();
        // Only files under our own ready/ directory are served.
        img.path
            .starts_with(self.firmware_root.join("ready"))
            .then_some(img)
    }

    /// Re-reads `devices`' attributes and the firmware index from state.db
    /// (after the CLI changed them); returns, per device, the shared
    /// attributes that changed (set, deleted) so they can be pushed.
    ///
    /// Fails when state.db cannot be read; the memory is unchanged then.
    pub fn reload(&self, devices: &[DeviceName]) -> Result<Vec<SharedChange>, AttributeError> {
        let sql = |source| AttributeError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let conn = statedb::open_read_only(&self.path)?;
        let (fresh, images) = load_all(&conn, Some(devices)).map_err(sql)?;
        let mut changes = Vec::new();
        if let Ok(mut g) = self.cache.write() {
            for d in devices {
                let new = fresh.get(d).cloned().unwrap_or_default();
                let old = g.insert(d.clone(), new.clone()).unwrap_or_default();
                let set: Map<String, Json> = new
                    .shared
                    .iter()
                    .filter(|(k, v)| old.shared.get(*k) != Some(*v))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let deleted: Vec<String> = old
                    .shared
                    .keys()
                    .filter(|k| !new.shared.contains_key(*k))
                    .cloned()
                    .collect();
                if !set.is_empty() || !deleted.is_empty() {
                    changes.push((d.clone(), set, deleted));
                }
            }
        }
        if let Ok(mut g) = self.images.write() {
            *g = images;
        }
        Ok(changes)
    }

    /// Waits until every change made so far is in state.db.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        self.persist(Write::Flush(tx));
        let _ = rx.recv();
    }

    /// Flushes and stops the writer thread.
    pub fn close(&self) {
        self.flush();
        if let Ok(mut g) = self.writer.lock() {
            g.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut g| g.take()) {
            let _ = t.join();
        }
    }
}

/// What a local staging did: the image, the devices it targets, and those
/// admitted at once (the others wait for a free campaign slot).
#[derive(Debug)]
pub struct Staged {
    /// The image in `ready/`.
    pub image: Image,
    /// Every targeted device.
    pub targets: Vec<String>,
    /// Devices whose `fw_*` attributes were set now.
    pub admitted: Vec<String>,
}

/// Stages `src` as firmware `title`/`version` (see [`sluice_firmware::stage`])
/// under `firmware_root`, indexes it in `state_db` and queues a campaign
/// ([`crate::campaign`]) for `devices` and every active device of one of
/// `types`; up to `max_concurrent` devices are admitted at once (their
/// ThingsBoard OTA shared attributes set). A device whose running or
/// campaigned version is not older is refused unless `allow_downgrade`.
/// The staging is recorded in the firmware audit with `actor`. Used by
/// `sluice firmware stage`; a running daemon must then
/// [`AttributeStore::reload`] the admitted devices.
///
/// Fails when no device is targeted, a named device is not registered, a
/// version is refused, staging fails, or state.db cannot be written (then
/// nothing is indexed and no attribute changed).
#[allow(clippy::too_many_arguments)]
pub fn stage_firmware(
    state_db: &Path,
    firmware_root: &Path,
    src: &Path,
    title: &str,
    version: &str,
    devices: &[DeviceName],
    types: &[String],
    max_concurrent: usize,
    allow_downgrade: bool,
    actor: &str,
) -> anyhow::Result<Staged> {
    use anyhow::Context;
    let mut conn = statedb::open(state_db)?;
    let mut targets: Vec<String> = Vec::new();
    for d in devices {
        let known: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM devices WHERE name = ?1 AND revoked = 0)",
                [d.as_str()],
                |r| r.get(0),
            )
            .context("reading the device registry")?;
        anyhow::ensure!(known, "no active device named {:?}", d.as_str());
        targets.push(d.as_str().to_owned());
    }
    for t in types {
        let mut stmt = conn
            .prepare("SELECT name FROM devices WHERE type = ?1 AND revoked = 0 ORDER BY name")
            .context("reading the device registry")?;
        let names: Vec<String> = stmt
            .query_map([t], |r| r.get(0))
            .and_then(Iterator::collect)
            .context("reading the device registry")?;
        for n in names {
            if !targets.contains(&n) {
                targets.push(n);
            }
        }
    }
    anyhow::ensure!(
        !targets.is_empty(),
        "no device to update: name --device NAME or --type TYPE (a type with no active device targets nothing)"
    );
    for d in &targets {
        let installed = crate::campaign::floor(&conn, d).context("reading firmware state")?;
        let newer = installed.as_deref().is_none_or(|i| {
            sluice_firmware::manifest::compare_versions(version, i).is_gt()
                || (allow_downgrade && version != i)
        });
        anyhow::ensure!(
            newer,
            "{d}: version {version} is not newer than {} (use --allow-downgrade to go back)",
            installed.unwrap_or_default()
        );
    }
    let img = sluice_firmware::stage(firmware_root, src, title, version)?;
    crate::campaign::enqueue(&mut conn, &img, &targets).context("queueing the campaign")?;
    let admitted = crate::campaign::admit(&mut conn, max_concurrent)
        .context("admitting devices")?
        .into_iter()
        .map(|(d, _, _)| d)
        .collect();
    crate::campaign::audit(
        &conn,
        "cli",
        actor,
        "staged",
        &serde_json::json!({"title": img.title, "version": img.version, "sha256": img.sha256,
            "size": img.size, "targets": targets, "allow_downgrade": allow_downgrade}),
    )
    .context("writing the firmware audit")?;
    Ok(Staged {
        image: img,
        targets,
        admitted,
    })
}

/// The staged images, newest first, for `sluice firmware list`.
///
/// Fails when state.db cannot be read.
pub fn list_firmware(state_db: &Path) -> anyhow::Result<Vec<(Image, i64)>> {
    let conn = statedb::open_read_only(state_db)?;
    let mut stmt = conn.prepare(
        "SELECT title, version, size, sha256, file, staged_ms FROM firmware_images ORDER BY staged_ms DESC",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            Image {
                title: r.get(0)?,
                version: r.get(1)?,
                size: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                sha256: r.get(3)?,
                path: PathBuf::from(r.get::<_, String>(4)?),
            },
            r.get(5)?,
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Json) -> Map<String, Json> {
        match v {
            Json::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn attributes_survive_a_restart_and_requests_pick_keys() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let d = DeviceName::new("dev-1");
        {
            let s = AttributeStore::load(&db, dir.path()).unwrap();
            s.set_client(&d, &map(json!({"model": "bench", "fwSupported": true})));
            let (set, deleted) = s.set_shared(&d, &map(json!({"targetTemp": 23, "mode": "eco"})));
            assert_eq!(set.len(), 2);
            assert!(deleted.is_empty());
            let (set, deleted) = s.set_shared(&d, &map(json!({"mode": null})));
            assert!(set.is_empty());
            assert_eq!(deleted, vec!["mode".to_string()]);
            s.close();
        }
        let s = AttributeStore::load(&db, dir.path()).unwrap();
        assert_eq!(
            s.request(
                &d,
                Some(&["model".into(), "nope".into()]),
                Some(&["targetTemp".into()])
            ),
            json!({"client": {"model": "bench"}, "shared": {"targetTemp": 23}})
        );
        assert_eq!(
            s.request(&d, None, Some(&["targetTemp".into()])),
            json!({"shared": {"targetTemp": 23}})
        );
        assert_eq!(
            s.request(&d, None, None),
            json!({"client": {"model": "bench", "fwSupported": true}, "shared": {"targetTemp": 23}})
        );
        assert_eq!(
            s.request(&DeviceName::new("other"), None, None),
            json!({"client": {}, "shared": {}})
        );
        s.close();
    }

    #[test]
    fn staged_firmware_is_reachable_only_by_its_target_devices() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let root = dir.path().join("firmware");
        {
            let c = statedb::open(&db).unwrap();
            for n in ["a", "b"] {
                c.execute(
                    "INSERT INTO devices (name, type, token_sha256, created_ms) VALUES (?1, 't', ?2, 0)",
                    params![n, n.as_bytes()],
                )
                .unwrap();
            }
        }
        let s = AttributeStore::load(&db, &root).unwrap();
        let src = dir.path().join("img");
        std::fs::write(&src, vec![7u8; 3000]).unwrap();
        let stage = |version: &str, devices: &[&str], types: &[&str], downgrade: bool| {
            let devices: Vec<DeviceName> = devices.iter().map(|d| DeviceName::new(*d)).collect();
            let types: Vec<String> = types.iter().map(|t| (*t).to_owned()).collect();
            stage_firmware(
                &db, &root, &src, "fw", version, &devices, &types, 10, downgrade, "test",
            )
        };
        assert!(
            stage("1.0", &["ghost"], &[], false).is_err(),
            "unknown devices are refused"
        );
        assert!(
            stage("1.0", &[], &["nosuchtype"], false).is_err(),
            "a campaign must target someone"
        );
        let staged = stage("1.0", &["a"], &[], false).unwrap();
        assert_eq!(staged.admitted, ["a"]);
        let img = staged.image;
        assert!(
            stage("0.9", &["a"], &[], false).is_err(),
            "no silent downgrade"
        );
        let changes = s
            .reload(&[DeviceName::new("a"), DeviceName::new("b")])
            .unwrap();
        assert_eq!(changes.len(), 1, "only a's shared attributes changed");
        assert_eq!(changes[0].1.get("fw_size"), Some(&json!(3000)));
        assert_eq!(s.firmware_for(&DeviceName::new("a")), Some(img.clone()));
        assert_eq!(s.firmware_for(&DeviceName::new("b")), None);
        assert_eq!(list_firmware(&db).unwrap()[0].0, img);
        // By type: both devices of type t, the downgrade allowed.
        let staged = stage("0.9", &[], &["t"], true).unwrap();
        assert_eq!(staged.targets, ["a", "b"]);
        s.close();
    }
}
