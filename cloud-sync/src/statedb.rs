//! `state_dir/state.db`: the gateway's small, precious state.
//!
//! Schema (PRAGMA user_version = 6):
//! - `identity(id = 1, epoch TEXT)`: the gateway epoch, random, created with the
//!   state dir; `(gateway, epoch, seq)` names a record even across a re-flash.
//! - `seq_mark(id = 1, next_free INTEGER)`: the seq high-water mark. Every seq
//!   below `next_free` may have been used; the outbox reserves blocks ahead of
//!   use and fsyncs the mark before a record with such a seq is committed, so a
//!   lost, replaced or restored `outbox.db` never makes a seq repeat.
//! - `devices(name, type, token_sha256, created_ms, revoked)`: the device
//!   registry (tokens only as SHA-256 hashes), written by the agent's registry.
//! - v2 adds `devices.cert_sha256` (nullable, unique when set): the SHA-256
//!   of the DER client certificate a device may authenticate with on mTLS.
//! - v3 adds `attributes(device, scope, key, value, updated_ms)`: the latest
//!   client attributes a device reported (`scope = 'client'`) and the shared
//!   attributes set for it by the cloud or a firmware campaign
//!   (`scope = 'shared'`), values as JSON text; and
//!   `firmware_images(title, version, size, sha256, file, staged_ms)`: the
//!   images staged in `state_dir/firmware/ready/`; and
//!   `devices.bridge_for` (nullable): a glob of device names this device may
//!   publish for on mapped legacy MQTT topics.
//! - v4 adds `devices.source` (`'cli'` default, or `'config'`): who registered
//!   the device. Devices listed in the configuration's `[[devices]]` (a local
//!   file or a signed fleet configuration) are merged in at daemon start and
//!   marked `'config'`, so a later configuration that no longer lists them
//!   revokes exactly those; CLI-added devices are never touched by it.
//! - v5 adds the firmware campaign state:
//!   `firmware_downloads(sha256, title, version, manifest, state, result,
//!   error, updated_ms)`: manifests accepted from the cloud and where their
//!   download stands (`downloading` | `ready` | `failed`; the bytes are in
//!   `firmware/staging/<sha256>.part` and survive restarts);
//!   `firmware_campaigns(device, title, version, sha256, state, fw_state,
//!   started_ms, updated_ms, error)`: one row per targeted device
//!   (`queued` → `active` → `updated` | `failed`); only `active` devices have
//!   the `fw_*` shared attributes and may fetch the image;
//!   `firmware_devices(device, title, version, fw_state, updated_ms)`: what
//!   each device last reported it runs (`current_fw_title/version`), the
//!   anti-rollback floor; and `firmware_audit(ts_ms, source, actor, action,
//!   detail)`: every local staging and every manifest decision.
//! - v6 adds `devices.psk_identity` (TEXT, nullable, unique when set: a
//!   UNIQUE index) and `devices.psk_key` (BLOB, set exactly when the
//!   identity is): a device's DTLS 1.2 pre-shared key for CoAP over DTLS.
//!   Unlike tokens the key is stored as is, because the handshake needs it.
//!
//! Durability: `synchronous = FULL` in WAL mode; every write here is rare.
//! Migrations run forward inside one transaction at open; a file whose
//! user_version is newer than this binary knows is refused, never rewritten.
//!
//! Permissions: `state.db` holds the PSKs in the clear, so [`open`] makes
//! it (and a `-wal` or `-shm` file left from before) mode 0600 before
//! anything else touches it; SQLite creates `-wal` and `-shm` with the main
//! file's mode, so those follow. Nothing else protects the keys: an
//! encryption key kept on the same disk would add nothing without a hardware
//! key store.

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The schema version this binary writes.
pub const STATE_SCHEMA_VERSION: i64 = 6;

/// Why state.db could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateDbError {
    /// SQLite failed on this file.
    #[error("state database {path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The file was written by a newer sluice.
    #[error(
        "state database {path} has schema version {found}, newer than this binary's {known}; \
         refusing to start (run the newer sluice, or restore a backup)"
    )]
    NewerSchema {
        /// The file.
        path: PathBuf,
        /// Its user_version.
        found: i64,
        /// Ours.
        known: i64,
    },
    /// The OS random source failed.
    #[error("cannot read random bytes for the gateway epoch: {0}")]
    Random(getrandom::Error),
    /// The file's permissions could not be read or narrowed to 0600.
    #[error(
        "state database {path}: cannot make it readable by its owner only (mode 0600; \
         run sluice as the file's owner): {source}"
    )]
    Permissions {
        /// The file (state.db, or its -wal or -shm file).
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Opens (creating and migrating as needed) `state.db` for writing; the
/// file and its `-wal` and `-shm` files are made mode 0600 first.
///
/// Fails when the file cannot be opened, its mode cannot be narrowed, it is
/// corrupt, or has a newer schema.
pub fn open(path: &Path) -> Result<Connection, StateDbError> {
    let sql = |source| StateDbError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let mut conn = Connection::open(path).map_err(sql)?;
    // Opening creates an empty file; nothing is written before this.
    restrict_to_owner(path)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sql)?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

/// Opens `state.db` read-only (for CLI commands that only look).
///
/// Fails when the file does not exist, cannot be read, or has a newer schema.
pub fn open_read_only(path: &Path) -> Result<Connection, StateDbError> {
    let sql = |source| StateDbError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sql)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql)?;
    if found > STATE_SCHEMA_VERSION {
        return Err(StateDbError::NewerSchema {
            path: path.to_owned(),
            found,
            known: STATE_SCHEMA_VERSION,
        });
    }
    Ok(conn)
}

/// Clears the group and other bits of `path` and of its `-wal` and `-shm`
/// files where present (a file already 0600 or stricter is left alone, so a
/// file owned by another user but private is no error).
fn restrict_to_owner(path: &Path) -> Result<(), StateDbError> {
    use std::os::unix::fs::PermissionsExt;
    let mut files = vec![path.to_owned()];
    for suffix in ["-wal", "-shm"] {
        let mut f = path.as_os_str().to_owned();
        f.push(suffix);
        files.push(PathBuf::from(f));
    }
    for file in files {
        let err = |source| StateDbError::Permissions {
            path: file.clone(),
            source,
        };
        let mode = match std::fs::metadata(&file) {
            Ok(m) => m.permissions().mode(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && file != path => continue,
            Err(e) => return Err(err(e)),
        };
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        }
    }
    Ok(())
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StateDbError> {
    let sql = |source| StateDbError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(sql)?;
    let found: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql)?;
    if found > STATE_SCHEMA_VERSION {
        return Err(StateDbError::NewerSchema {
            path: path.to_owned(),
            found,
            known: STATE_SCHEMA_VERSION,
        });
    }
    if found < 1 {
        let mut epoch = [0u8; 8];
        getrandom::fill(&mut epoch).map_err(StateDbError::Random)?;
        let epoch: String = epoch.iter().map(|b| format!("{b:02x}")).collect();
        tx.execute_batch(
            "CREATE TABLE identity (id INTEGER PRIMARY KEY CHECK (id = 1), epoch TEXT NOT NULL);
             CREATE TABLE seq_mark (id INTEGER PRIMARY KEY CHECK (id = 1), next_free INTEGER NOT NULL);
             INSERT INTO seq_mark (id, next_free) VALUES (1, 1);
             CREATE TABLE devices (
                 name TEXT PRIMARY KEY,
                 type TEXT NOT NULL,
                 token_sha256 BLOB NOT NULL UNIQUE,
                 created_ms INTEGER NOT NULL,
                 revoked INTEGER NOT NULL DEFAULT 0
             );
             PRAGMA user_version = 1;",
        )
        .map_err(sql)?;
        tx.execute("INSERT INTO identity (id, epoch) VALUES (1, ?1)", [&epoch])
            .map_err(sql)?;
    }
    if found < 2 {
        // SQLite cannot add a UNIQUE column; a unique index allows many NULLs.
        tx.execute_batch(
            "ALTER TABLE devices ADD COLUMN cert_sha256 BLOB;
             CREATE UNIQUE INDEX devices_cert_sha256 ON devices (cert_sha256);
             PRAGMA user_version = 2;",
        )
        .map_err(sql)?;
    }
    if found < 3 {
        tx.execute_batch(
            "CREATE TABLE attributes (
                 device TEXT NOT NULL,
                 scope TEXT NOT NULL CHECK (scope IN ('client', 'shared')),
                 key TEXT NOT NULL,
                 value TEXT NOT NULL,
                 updated_ms INTEGER NOT NULL,
                 PRIMARY KEY (device, scope, key)
             ) WITHOUT ROWID;
             CREATE TABLE firmware_images (
                 title TEXT NOT NULL,
                 version TEXT NOT NULL,
                 size INTEGER NOT NULL,
                 sha256 TEXT NOT NULL,
                 file TEXT NOT NULL,
                 staged_ms INTEGER NOT NULL,
                 PRIMARY KEY (title, version)
             );
             ALTER TABLE devices ADD COLUMN bridge_for TEXT;
             PRAGMA user_version = 3;",
        )
        .map_err(sql)?;
    }
    if found < 4 {
        tx.execute_batch(
            "ALTER TABLE devices ADD COLUMN source TEXT NOT NULL DEFAULT 'cli'
                 CHECK (source IN ('cli', 'config'));
             PRAGMA user_version = 4;",
        )
        .map_err(sql)?;
    }
    if found < 5 {
        tx.execute_batch(
            "CREATE TABLE firmware_downloads (
                 sha256 TEXT PRIMARY KEY,
                 title TEXT NOT NULL,
                 version TEXT NOT NULL,
                 manifest TEXT NOT NULL,
                 state TEXT NOT NULL CHECK (state IN ('downloading', 'ready', 'failed')),
                 result TEXT NOT NULL DEFAULT 'initial',
                 error TEXT,
                 updated_ms INTEGER NOT NULL
             );
             CREATE TABLE firmware_campaigns (
                 device TEXT PRIMARY KEY,
                 title TEXT NOT NULL,
                 version TEXT NOT NULL,
                 sha256 TEXT NOT NULL,
                 state TEXT NOT NULL CHECK (state IN ('queued', 'active', 'updated', 'failed')),
                 fw_state TEXT,
                 started_ms INTEGER,
                 updated_ms INTEGER NOT NULL,
                 error TEXT
             );
             CREATE TABLE firmware_devices (
                 device TEXT PRIMARY KEY,
                 title TEXT,
                 version TEXT,
                 fw_state TEXT,
                 updated_ms INTEGER NOT NULL
             );
             CREATE TABLE firmware_audit (
                 ts_ms INTEGER NOT NULL,
                 source TEXT NOT NULL,
                 actor TEXT NOT NULL,
                 action TEXT NOT NULL,
                 detail TEXT NOT NULL
             );
             PRAGMA user_version = 5;",
        )
        .map_err(sql)?;
    }
    if found < 6 {
        tx.execute_batch(
            "ALTER TABLE devices ADD COLUMN psk_identity TEXT;
             ALTER TABLE devices ADD COLUMN psk_key BLOB
                 CHECK ((psk_key IS NULL) = (psk_identity IS NULL));
             CREATE UNIQUE INDEX devices_psk_identity ON devices (psk_identity);
             PRAGMA user_version = 6;",
        )
        .map_err(sql)?;
    }
    tx.commit().map_err(sql)
}

/// The gateway epoch stored in state.db.
///
/// Fails when the identity row cannot be read.
pub fn epoch(conn: &Connection) -> rusqlite::Result<String> {
    conn.query_row("SELECT epoch FROM identity WHERE id = 1", [], |r| r.get(0))
}

/// The seq high-water mark: every seq below it may have been used.
pub(crate) fn seq_mark(conn: &Connection) -> rusqlite::Result<u64> {
    let v: Option<i64> = conn
        .query_row("SELECT next_free FROM seq_mark WHERE id = 1", [], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(v.map_or(1, |v| u64::try_from(v).unwrap_or(1)))
}

/// Durably raises the seq high-water mark (never lowers it).
pub(crate) fn raise_seq_mark(conn: &Connection, next_free: u64) -> rusqlite::Result<()> {
    let v = i64::try_from(next_free).unwrap_or(i64::MAX);
    conn.execute(
        "UPDATE seq_mark SET next_free = max(next_free, ?1) WHERE id = 1",
        params![v],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        let e1 = epoch(&open(&p).unwrap()).unwrap();
        let e2 = epoch(&open(&p).unwrap()).unwrap();
        assert_eq!(e1, e2);
        assert_eq!(e1.len(), 16);
    }

    #[test]
    fn newer_schema_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        drop(open(&p).unwrap());
        Connection::open(&p)
            .unwrap()
            .pragma_update(None, "user_version", 7)
            .unwrap();
        let err = open(&p).unwrap_err();
        assert!(
            matches!(err, StateDbError::NewerSchema { found: 7, .. }),
            "{err}"
        );
        let v: i64 = Connection::open(&p)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, 7);
    }

    #[test]
    fn a_v1_file_is_migrated_to_the_current_schema_keeping_its_devices() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(
                "CREATE TABLE identity (id INTEGER PRIMARY KEY CHECK (id = 1), epoch TEXT NOT NULL);
                 CREATE TABLE seq_mark (id INTEGER PRIMARY KEY CHECK (id = 1), next_free INTEGER NOT NULL);
                 INSERT INTO seq_mark (id, next_free) VALUES (1, 42);
                 CREATE TABLE devices (
                     name TEXT PRIMARY KEY,
                     type TEXT NOT NULL,
                     token_sha256 BLOB NOT NULL UNIQUE,
                     created_ms INTEGER NOT NULL,
                     revoked INTEGER NOT NULL DEFAULT 0
                 );
                 INSERT INTO identity (id, epoch) VALUES (1, '00112233aabbccdd');
                 INSERT INTO devices (name, type, token_sha256, created_ms) VALUES ('d1', 't', x'01', 5);
                 INSERT INTO devices (name, type, token_sha256, created_ms) VALUES ('d2', 't', x'02', 6);
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let c = open(&p).unwrap();
        let v: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, STATE_SCHEMA_VERSION);
        assert_eq!(epoch(&c).unwrap(), "00112233aabbccdd");
        assert_eq!(seq_mark(&c).unwrap(), 42);
        let certs: Vec<Option<Vec<u8>>> = c
            .prepare("SELECT cert_sha256 FROM devices ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(certs, vec![None, None]);
        c.execute(
            "UPDATE devices SET cert_sha256 = x'aa' WHERE name = 'd1'",
            [],
        )
        .unwrap();
        assert!(
            c.execute(
                "UPDATE devices SET cert_sha256 = x'aa' WHERE name = 'd2'",
                []
            )
            .is_err(),
            "a fingerprint belongs to one device"
        );
        c.execute(
            "INSERT INTO attributes (device, scope, key, value, updated_ms) VALUES ('d1', 'shared', 'k', '1', 0)",
            [],
        )
        .unwrap();
        assert!(
            c.execute(
                "INSERT INTO attributes (device, scope, key, value, updated_ms) VALUES ('d1', 'other', 'k', '1', 0)",
                []
            )
            .is_err(),
            "scope is client or shared"
        );
        drop(c);
        // Opening again is a no-op.
        drop(open(&p).unwrap());
    }

    /// Turns a current file back into a v5 one (SQLite drops a column only
    /// once its index and any CHECK naming it are gone).
    const BACK_TO_V5: &str = "DROP INDEX devices_psk_identity;
         ALTER TABLE devices DROP COLUMN psk_key;
         ALTER TABLE devices DROP COLUMN psk_identity;
         PRAGMA user_version = 5;";

    #[test]
    fn v6_adds_psk_columns_to_a_v5_file_keeping_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        {
            let c = open(&p).unwrap();
            c.execute_batch(BACK_TO_V5).unwrap();
            c.execute_batch(
                "INSERT INTO devices (name, type, token_sha256, created_ms, revoked, cert_sha256, bridge_for, source)
                     VALUES ('d1', 't', x'01', 5, 0, x'aa', 'room-*', 'config');
                 INSERT INTO devices (name, type, token_sha256, created_ms, revoked)
                     VALUES ('d2', 'u', x'02', 6, 1);
                 INSERT INTO attributes (device, scope, key, value, updated_ms)
                     VALUES ('d1', 'shared', 'k', '1', 7);
                 INSERT INTO firmware_images (title, version, size, sha256, file, staged_ms)
                     VALUES ('fw', '1', 3, 'x', 'f', 8);
                 INSERT INTO firmware_campaigns (device, title, version, sha256, state, updated_ms)
                     VALUES ('d1', 'fw', '1', 'x', 'queued', 9);
                 UPDATE seq_mark SET next_free = 77;",
            )
            .unwrap();
            assert!(
                c.prepare("SELECT psk_identity FROM devices").is_err(),
                "really a v5 file"
            );
        }
        let c = open(&p).unwrap();
        let v: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, 6);
        type DeviceRow = (
            String,
            String,
            i64,
            i64,
            Option<Vec<u8>>,
            Option<String>,
            String,
        );
        let rows: Vec<DeviceRow> = c
            .prepare(
                "SELECT name, type, created_ms, revoked, cert_sha256, bridge_for, source \
                 FROM devices ORDER BY name",
            )
            .unwrap()
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows,
            vec![
                (
                    "d1".into(),
                    "t".into(),
                    5,
                    0,
                    Some(vec![0xaa]),
                    Some("room-*".into()),
                    "config".into()
                ),
                ("d2".into(), "u".into(), 6, 1, None, None, "cli".into()),
            ]
        );
        for (table, n) in [
            ("attributes", 1),
            ("firmware_images", 1),
            ("firmware_campaigns", 1),
        ] {
            let got: i64 = c
                .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .unwrap();
            assert_eq!(got, n, "{table}");
        }
        assert_eq!(seq_mark(&c).unwrap(), 77);
        let psks: Vec<(Option<String>, Option<Vec<u8>>)> = c
            .prepare("SELECT psk_identity, psk_key FROM devices")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(psks, vec![(None, None), (None, None)]);

        c.execute(
            "UPDATE devices SET psk_identity = 'id-1', psk_key = x'01' WHERE name = 'd1'",
            [],
        )
        .unwrap();
        assert!(
            c.execute(
                "UPDATE devices SET psk_identity = 'id-1', psk_key = x'02' WHERE name = 'd2'",
                [],
            )
            .is_err(),
            "an identity belongs to one device"
        );
        assert!(
            c.execute(
                "UPDATE devices SET psk_identity = 'id-2' WHERE name = 'd2'",
                []
            )
            .is_err(),
            "an identity comes with a key"
        );
        assert!(
            c.execute("UPDATE devices SET psk_key = x'02' WHERE name = 'd2'", [])
                .is_err(),
            "a key comes with an identity"
        );
        drop(c);
        drop(open(&p).unwrap());
    }

    #[test]
    fn a_new_state_db_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        let c = open(&p).unwrap();
        c.execute("UPDATE seq_mark SET next_free = 9", []).unwrap();
        for f in ["state.db", "state.db-wal", "state.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }

    #[test]
    fn an_existing_group_readable_state_db_is_narrowed_to_0600_on_open() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        drop(open(&p).unwrap());
        // A -wal left behind by a crash, from when the file was 0644.
        let wal = dir.path().join("state.db-wal");
        std::fs::write(&wal, b"").unwrap();
        for f in [&p, &wal] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let c = open(&p).unwrap();
        for f in [&p, &wal] {
            let mode = std::fs::metadata(f).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", f.display());
        }
        assert_eq!(seq_mark(&c).unwrap(), 1);
    }

    #[test]
    fn v5_adds_the_firmware_campaign_tables_to_a_v4_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        {
            let c = open(&p).unwrap();
            c.execute_batch(BACK_TO_V5).unwrap();
            c.execute_batch(
                "DROP TABLE firmware_downloads; DROP TABLE firmware_campaigns;
                 DROP TABLE firmware_devices; DROP TABLE firmware_audit;
                 INSERT INTO devices (name, type, token_sha256, created_ms) VALUES ('d1', 't', x'01', 5);
                 PRAGMA user_version = 4;",
            )
            .unwrap();
        }
        let c = open(&p).unwrap();
        let v: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, STATE_SCHEMA_VERSION);
        for t in [
            "firmware_downloads",
            "firmware_campaigns",
            "firmware_devices",
            "firmware_audit",
        ] {
            let n: i64 = c
                .query_row(&format!("SELECT count(*) FROM {t}"), [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 0, "{t}");
        }
        assert!(
            c.execute(
                "INSERT INTO firmware_campaigns (device, title, version, sha256, state, updated_ms)
                 VALUES ('d1', 'fw', '1', 'x', 'done', 0)",
                [],
            )
            .is_err(),
            "campaign states are checked"
        );
        let kept: i64 = c
            .query_row("SELECT count(*) FROM devices", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kept, 1);
    }

    #[test]
    fn v4_marks_existing_devices_as_cli_added_and_takes_only_cli_or_config() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        {
            let c = open(&p).unwrap();
            // Back to a v3 file with a device in it.
            c.execute_batch(BACK_TO_V5).unwrap();
            c.execute_batch(
                "DROP TABLE firmware_downloads; DROP TABLE firmware_campaigns;
                 DROP TABLE firmware_devices; DROP TABLE firmware_audit;
                 ALTER TABLE devices DROP COLUMN source;
                 INSERT INTO devices (name, type, token_sha256, created_ms) VALUES ('d1', 't', x'01', 5);
                 PRAGMA user_version = 3;",
            )
            .unwrap();
        }
        let c = open(&p).unwrap();
        let source: String = c
            .query_row("SELECT source FROM devices WHERE name = 'd1'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(source, "cli");
        assert!(
            c.execute("UPDATE devices SET source = 'cloud' WHERE name = 'd1'", [])
                .is_err()
        );
        c.execute("UPDATE devices SET source = 'config' WHERE name = 'd1'", [])
            .unwrap();
    }

    #[test]
    fn seq_mark_only_rises() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(&dir.path().join("state.db")).unwrap();
        assert_eq!(seq_mark(&c).unwrap(), 1);
        raise_seq_mark(&c, 500).unwrap();
        raise_seq_mark(&c, 100).unwrap();
        assert_eq!(seq_mark(&c).unwrap(), 500);
    }
}
