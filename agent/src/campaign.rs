//! Firmware campaigns for the devices behind the gateway, kept in
//! `state.db` (schema v5, see `sluice_cloud_sync::statedb`).
//!
//! A campaign is one row per targeted device in `firmware_campaigns`:
//! `queued` → `active` → `updated` | `failed`. Only `active` devices have
//! the ThingsBoard OTA shared attributes (`fw_title`, `fw_version`,
//! `fw_size`, `fw_checksum`, `fw_checksum_algorithm = "SHA256"`), so only
//! they learn of the image and only they may fetch it (the listeners serve
//! a device exactly the image its `fw_*` attributes name). At most
//! `firmware.max_concurrent_devices` are active at once; the next queued
//! device is admitted when one finishes, fails, or shows no progress for
//! `firmware.device_timeout`.
//!
//! Progress comes from the device's own telemetry, as ThingsBoard's OTA
//! convention has it: `fw_state` (DOWNLOADING, DOWNLOADED, VERIFIED,
//! UPDATING, UPDATED, FAILED) and `current_fw_title` / `current_fw_version`.
//! What a device last reported it runs (`firmware_devices`) is the
//! anti-rollback floor for the next manifest.
//!
//! Everything here is plain SQL on a connection, used by both the CLI
//! (`sluice firmware stage`, daemon stopped or running) and the daemon's
//! firmware task; each function is one transaction.

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value as Json, json};
use sluice_firmware::Image;
use sluice_firmware::lwm2m::{UpdateResult, UpdateState};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A device's OTA state as it reports it in `fw_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FwState {
    /// Fetching the image.
    Downloading,
    /// All bytes received.
    Downloaded,
    /// Checksum verified.
    Verified,
    /// Installing.
    Updating,
    /// Running the new image.
    Updated,
    /// Gave up.
    Failed,
}

impl FwState {
    /// Parses ThingsBoard's names (case-insensitive); `IDLE` and anything
    /// else is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_uppercase().as_str() {
            "DOWNLOADING" => Self::Downloading,
            "DOWNLOADED" => Self::Downloaded,
            "VERIFIED" => Self::Verified,
            "UPDATING" => Self::Updating,
            "UPDATED" => Self::Updated,
            "FAILED" => Self::Failed,
            _ => return None,
        })
    }

    /// ThingsBoard's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Downloading => "DOWNLOADING",
            Self::Downloaded => "DOWNLOADED",
            Self::Verified => "VERIFIED",
            Self::Updating => "UPDATING",
            Self::Updated => "UPDATED",
            Self::Failed => "FAILED",
        }
    }

    /// The LwM2M object 5 view: (state, result).
    pub fn lwm2m(self) -> (UpdateState, UpdateResult) {
        match self {
            Self::Downloading => (UpdateState::Downloading, UpdateResult::Initial),
            Self::Downloaded | Self::Verified => (UpdateState::Downloaded, UpdateResult::Initial),
            Self::Updating => (UpdateState::Updating, UpdateResult::Initial),
            Self::Updated => (UpdateState::Idle, UpdateResult::Success),
            Self::Failed => (UpdateState::Idle, UpdateResult::UpdateFailed),
        }
    }
}

/// A `P/firmware/state` report for a device.
pub fn device_report(
    device: &str,
    title: &str,
    version: &str,
    state: UpdateState,
    result: UpdateResult,
    fw_state: Option<&str>,
    error: Option<&str>,
) -> Json {
    let mut r = json!({
        "target": "device",
        "device": device,
        "title": title,
        "version": version,
        "state": state.name(),
        "result": result.name(),
        "result_code": result.code(),
    });
    if let Some(s) = fw_state {
        r["fw_state"] = json!(s);
    }
    if let Some(e) = error {
        r["error"] = json!(e);
    }
    r
}

/// Records a decision or a local staging in `firmware_audit`.
///
/// Fails when state.db cannot be written.
pub fn audit(
    conn: &Connection,
    source: &str,
    actor: &str,
    action: &str,
    detail: &Json,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO firmware_audit (ts_ms, source, actor, action, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![now_ms(), source, actor, action, detail.to_string()],
    )?;
    Ok(())
}

/// Indexes a ready image in `firmware_images` (title, version → file).
///
/// Fails when state.db cannot be written.
pub fn index_image(conn: &Connection, img: &Image) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO firmware_images (title, version, size, sha256, file, staged_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (title, version) DO UPDATE SET size = excluded.size, sha256 = excluded.sha256,
             file = excluded.file, staged_ms = excluded.staged_ms",
        params![
            img.title,
            img.version,
            i64::try_from(img.size).unwrap_or(i64::MAX),
            img.sha256,
            img.path.to_string_lossy(),
            now_ms()
        ],
    )?;
    Ok(())
}

/// The version `device` must be upgraded from: what it last reported it
/// runs, or else the version of a campaign it already has (so a replayed
/// older manifest cannot replace a newer one).
///
/// Fails when state.db cannot be read.
pub fn floor(conn: &Connection, device: &str) -> rusqlite::Result<Option<String>> {
    let running: Option<String> = conn
        .query_row(
            "SELECT version FROM firmware_devices WHERE device = ?1 AND version IS NOT NULL",
            [device],
            |r| r.get(0),
        )
        .optional()?;
    let campaign: Option<String> = conn
        .query_row(
            "SELECT version FROM firmware_campaigns WHERE device = ?1 AND state != 'failed'",
            [device],
            |r| r.get(0),
        )
        .optional()?;
    Ok(match (running, campaign) {
        (Some(a), Some(b)) => Some(
            if sluice_firmware::manifest::compare_versions(&a, &b).is_ge() {
                a
            } else {
                b
            },
        ),
        (a, b) => a.or(b),
    })
}

/// Queues `img` for `devices` (replacing any earlier campaign of theirs).
///
/// Fails when state.db cannot be written; nothing changed then.
pub fn enqueue(conn: &mut Connection, img: &Image, devices: &[String]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    index_image(&tx, img)?;
    let now = now_ms();
    for d in devices {
        tx.execute(
            "INSERT INTO firmware_campaigns (device, title, version, sha256, state, fw_state, started_ms, updated_ms, error)
             VALUES (?1, ?2, ?3, ?4, 'queued', NULL, NULL, ?5, NULL)
             ON CONFLICT (device) DO UPDATE SET title = excluded.title, version = excluded.version,
                 sha256 = excluded.sha256, state = 'queued', fw_state = NULL, started_ms = NULL,
                 updated_ms = excluded.updated_ms, error = NULL",
            params![d, img.title, img.version, img.sha256, now],
        )?;
        // Until admitted the device must not see (or fetch) the new image;
        // an older campaign's attributes are withdrawn.
        tx.execute(
            "DELETE FROM attributes WHERE device = ?1 AND scope = 'shared' AND key IN
                 ('fw_title', 'fw_version', 'fw_size', 'fw_checksum', 'fw_checksum_algorithm')",
            [d],
        )?;
    }
    tx.commit()
}

/// A device admitted to its campaign: (device, title, version).
pub type Admitted = (String, String, String);

/// Admits queued devices (oldest first) while fewer than `max` are active:
/// sets their `fw_*` shared attributes and marks them active. Returns who
/// was admitted; the caller reloads their attributes and pushes them.
///
/// Fails when state.db cannot be written; nothing changed then.
pub fn admit(conn: &mut Connection, max: usize) -> rusqlite::Result<Vec<Admitted>> {
    let tx = conn.transaction()?;
    let active: i64 = tx.query_row(
        "SELECT count(*) FROM firmware_campaigns WHERE state = 'active'",
        [],
        |r| r.get(0),
    )?;
    let room = max.saturating_sub(usize::try_from(active).unwrap_or(usize::MAX));
    let mut admitted = Vec::new();
    if room > 0 {
        let mut stmt = tx.prepare(
            "SELECT c.device, c.title, c.version, i.size, c.sha256 FROM firmware_campaigns c
             JOIN firmware_images i ON i.title = c.title AND i.version = c.version
             WHERE c.state = 'queued' ORDER BY c.updated_ms, c.device LIMIT ?1",
        )?;
        let rows = stmt.query_map([i64::try_from(room).unwrap_or(i64::MAX)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
            ))
        })?;
        let picked: Vec<_> = rows.collect::<Result<_, _>>()?;
        drop(stmt);
        let now = now_ms();
        for (device, title, version, size, sha256) in picked {
            let attrs = [
                ("fw_title", Json::String(title.clone())),
                ("fw_version", Json::String(version.clone())),
                ("fw_size", Json::from(size)),
                ("fw_checksum", Json::String(sha256)),
                ("fw_checksum_algorithm", Json::String("SHA256".into())),
            ];
            for (k, v) in attrs {
                tx.execute(
                    "INSERT INTO attributes (device, scope, key, value, updated_ms) VALUES (?1, 'shared', ?2, ?3, ?4)
                     ON CONFLICT (device, scope, key) DO UPDATE SET value = excluded.value, updated_ms = excluded.updated_ms",
                    params![device, k, v.to_string(), now],
                )?;
            }
            tx.execute(
                "UPDATE firmware_campaigns SET state = 'active', started_ms = ?2, updated_ms = ?2 WHERE device = ?1",
                params![device, now],
            )?;
            admitted.push((device, title, version));
        }
    }
    tx.commit()?;
    Ok(admitted)
}

/// What a device's report changed in its campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The device.
    pub device: String,
    /// Its campaign's title and version.
    pub title: String,
    /// Its campaign's version.
    pub version: String,
    /// What it reported.
    pub fw_state: FwState,
    /// Whether the campaign ended for it (updated or failed: a slot freed).
    pub finished: bool,
}

/// Takes a device's OTA telemetry: records what it runs and, when it has
/// an active campaign, its state. `UPDATED` ends the campaign as updated
/// (when the reported version, if any, is the campaign's), `FAILED` as
/// failed. Returns the change to report, if the device has a campaign and
/// the state is new.
///
/// Fails when state.db cannot be written.
pub fn report(
    conn: &mut Connection,
    device: &str,
    fw_state: Option<&str>,
    current_title: Option<&str>,
    current_version: Option<&str>,
) -> rusqlite::Result<Option<Progress>> {
    let tx = conn.transaction()?;
    let now = now_ms();
    let state = fw_state.and_then(FwState::parse);
    if current_version.is_some() || state.is_some() {
        tx.execute(
            "INSERT INTO firmware_devices (device, title, version, fw_state, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (device) DO UPDATE SET title = coalesce(excluded.title, title),
                 version = coalesce(excluded.version, version),
                 fw_state = coalesce(excluded.fw_state, fw_state), updated_ms = excluded.updated_ms",
            params![device, current_title, current_version, state.map(FwState::name), now],
        )?;
    }
    let mut out = None;
    if let Some(st) = state {
        let row: Option<(String, String, Option<String>)> = tx
            .query_row(
                "SELECT title, version, fw_state FROM firmware_campaigns WHERE device = ?1 AND state = 'active'",
                [device],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        if let Some((title, version, previous)) = row {
            let other_version = current_version.is_some_and(|v| v != version);
            let (campaign_state, finished) = match st {
                FwState::Updated if !other_version => ("updated", true),
                FwState::Failed => ("failed", true),
                _ => ("active", false),
            };
            tx.execute(
                "UPDATE firmware_campaigns SET state = ?2, fw_state = ?3, updated_ms = ?4,
                     error = CASE WHEN ?2 = 'failed' THEN 'the device reported FAILED' ELSE NULL END
                 WHERE device = ?1",
                params![device, campaign_state, st.name(), now],
            )?;
            if previous.as_deref() != Some(st.name()) || finished {
                out = Some(Progress {
                    device: device.to_owned(),
                    title,
                    version,
                    fw_state: st,
                    finished,
                });
            }
        }
    }
    tx.commit()?;
    Ok(out)
}

/// Marks active devices with no progress for `timeout` as failed; returns
/// them with their campaign (device, title, version).
///
/// Fails when state.db cannot be written.
pub fn expire(conn: &mut Connection, timeout: Duration) -> rusqlite::Result<Vec<Admitted>> {
    let tx = conn.transaction()?;
    let cutoff = now_ms().saturating_sub(i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX));
    let stuck: Vec<Admitted> = {
        let mut stmt = tx.prepare(
            "SELECT device, title, version FROM firmware_campaigns WHERE state = 'active' AND updated_ms < ?1",
        )?;
        let rows = stmt.query_map([cutoff], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    for (d, _, _) in &stuck {
        tx.execute(
            "UPDATE firmware_campaigns SET state = 'failed', updated_ms = ?2,
                 error = 'no progress within firmware.device_timeout' WHERE device = ?1",
            params![d, now_ms()],
        )?;
    }
    tx.commit()?;
    Ok(stuck)
}

/// The sha256s of images a campaign still needs (queued or active) — kept
/// by retention.
///
/// Fails when state.db cannot be read.
pub fn in_use(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(
        "SELECT DISTINCT sha256 FROM firmware_campaigns WHERE state IN ('queued', 'active')
         UNION SELECT sha256 FROM firmware_downloads WHERE state = 'downloading'",
    )?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    rows.collect()
}

/// Everything `sluice firmware status` shows.
///
/// Fails when state.db cannot be read.
pub fn status(conn: &Connection) -> rusqlite::Result<Json> {
    let mut downloads = Vec::new();
    {
        let mut stmt = conn.prepare(
            "SELECT sha256, title, version, manifest, state, result, error, updated_ms
             FROM firmware_downloads ORDER BY updated_ms DESC LIMIT 50",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let manifest: String = r.get(3)?;
            let m: Json = serde_json::from_str(&manifest).unwrap_or(Json::Null);
            downloads.push(json!({
                "sha256": r.get::<_, String>(0)?,
                "title": r.get::<_, String>(1)?,
                "version": r.get::<_, String>(2)?,
                "size": m.get("size").cloned().unwrap_or(Json::Null),
                "url": m.get("url").cloned().unwrap_or(Json::Null),
                "targets": m.get("targets").cloned().unwrap_or(Json::Null),
                "state": r.get::<_, String>(4)?,
                "result": r.get::<_, String>(5)?,
                "error": r.get::<_, Option<String>>(6)?,
                "updated_ms": r.get::<_, i64>(7)?,
            }));
        }
    }
    let mut campaigns = Vec::new();
    {
        let mut stmt = conn.prepare(
            "SELECT device, title, version, state, fw_state, started_ms, updated_ms, error
             FROM firmware_campaigns ORDER BY device",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            campaigns.push(json!({
                "device": r.get::<_, String>(0)?,
                "title": r.get::<_, String>(1)?,
                "version": r.get::<_, String>(2)?,
                "state": r.get::<_, String>(3)?,
                "fw_state": r.get::<_, Option<String>>(4)?,
                "started_ms": r.get::<_, Option<i64>>(5)?,
                "updated_ms": r.get::<_, i64>(6)?,
                "error": r.get::<_, Option<String>>(7)?,
            }));
        }
    }
    Ok(json!({"downloads": downloads, "campaigns": campaigns}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = sluice_cloud_sync::statedb::open(&dir.path().join("state.db")).unwrap();
        (dir, conn)
    }

    fn image(version: &str) -> Image {
        Image {
            title: "fw".into(),
            version: version.into(),
            size: 100,
            sha256: format!("{:0>64}", version.replace('.', "")),
            path: PathBuf::from("/nonexistent"),
        }
    }

    fn shared(conn: &Connection, device: &str) -> Vec<String> {
        let mut stmt = conn
            .prepare(
                "SELECT key FROM attributes WHERE device = ?1 AND scope = 'shared' ORDER BY key",
            )
            .unwrap();
        stmt.query_map([device], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn at_most_max_devices_are_active_and_finishing_admits_the_next() {
        let (_d, mut conn) = db();
        let devices: Vec<String> = ["a", "b", "c"].map(str::to_owned).to_vec();
        enqueue(&mut conn, &image("1.0"), &devices).unwrap();
        assert!(shared(&conn, "a").is_empty(), "queued devices see nothing");
        let first = admit(&mut conn, 2).unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(shared(&conn, "a").len(), 5);
        assert!(shared(&conn, "c").is_empty());
        assert!(admit(&mut conn, 2).unwrap().is_empty(), "no room");
        let p = report(&mut conn, "a", Some("DOWNLOADING"), None, None)
            .unwrap()
            .unwrap();
        assert!(!p.finished);
        assert!(
            report(&mut conn, "a", Some("DOWNLOADING"), None, None)
                .unwrap()
                .is_none(),
            "the same state again is not news"
        );
        let p = report(&mut conn, "a", Some("UPDATED"), Some("fw"), Some("1.0"))
            .unwrap()
            .unwrap();
        assert!(p.finished);
        let next = admit(&mut conn, 2).unwrap();
        assert_eq!(next, vec![("c".into(), "fw".into(), "1.0".into())]);
        assert_eq!(floor(&conn, "a").unwrap().as_deref(), Some("1.0"));
    }

    #[test]
    fn stuck_devices_time_out_and_free_their_slot() {
        let (_d, mut conn) = db();
        enqueue(&mut conn, &image("1.0"), &["a".into(), "b".into()]).unwrap();
        admit(&mut conn, 1).unwrap();
        assert!(
            expire(&mut conn, Duration::from_secs(60))
                .unwrap()
                .is_empty()
        );
        // Its last progress a minute ago.
        conn.execute(
            "UPDATE firmware_campaigns SET updated_ms = updated_ms - 60000 WHERE state = 'active'",
            [],
        )
        .unwrap();
        let stuck = expire(&mut conn, Duration::from_secs(30)).unwrap();
        assert_eq!(stuck.len(), 1);
        assert_eq!(admit(&mut conn, 1).unwrap().len(), 1);
    }

    #[test]
    fn the_floor_is_the_newer_of_what_runs_and_what_is_campaigned() {
        let (_d, mut conn) = db();
        assert_eq!(floor(&conn, "a").unwrap(), None);
        report(&mut conn, "a", None, Some("fw"), Some("1.2")).unwrap();
        assert_eq!(floor(&conn, "a").unwrap().as_deref(), Some("1.2"));
        enqueue(&mut conn, &image("1.10"), &["a".into()]).unwrap();
        assert_eq!(floor(&conn, "a").unwrap().as_deref(), Some("1.10"));
    }
}
