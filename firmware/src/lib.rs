//! sluice-firmware: firmware for the gateway and the devices behind it, from
//! the cloud's manifest to an image in the local store.
//!
//! Data flow: the agent verifies a signed envelope and hands its payload to
//! [`manifest::Manifest::parse`] (strict validation, anti-rollback with
//! [`manifest::Manifest::admits_over`] and [`version::compare_versions`]);
//! [`download::download`] fetches the image over HTTPS (TLS via rustls/ring,
//! a minimal HTTP/1.1 client of its own), resuming with `Range` after a
//! network error or a restart, checks its SHA-256 and size, and publishes it
//! in the **image store**; [`lwm2m::Transfer`] tracks the LwM2M object 5
//! state and result code the agent reports (`P/firmware/state`). No module
//! here spawns a task or owns a socket beyond one download call.
//!
//! The image store lives under the firmware root (`state_dir/firmware/`):
//! `staging/` holds incomplete files (a download's `<sha256>.part` survives
//! restarts), `ready/<sha256>.bin` holds complete, verified images, renamed
//! there only once fsynced, so a crash never leaves a partial image in
//! `ready/`. [`stage`] copies a local file into the same store;
//! [`download::prune`] evicts old images. [`chunk_range`] and [`read_range`]
//! serve images in ThingsBoard's OTA chunk numbering.
//!
//! ```no_run
//! # async fn run(payload: &[u8], installed: Option<&str>) -> Result<(), Box<dyn std::error::Error>> {
//! use sluice_firmware::{download, manifest::Manifest};
//! use std::{path::Path, time::Duration};
//!
//! let m = Manifest::parse(payload, 64 << 20)?;
//! if m.admits_over(installed) {
//!     let req = download::Request {
//!         url: &m.url,
//!         size: m.size,
//!         sha256: &m.sha256,
//!         root: Path::new("/var/lib/sluice/firmware"),
//!         tls: download::client_config(Path::new("/etc/ssl/certs/ca-certificates.crt"))?,
//!         attempts: 8,
//!         idle_timeout: Duration::from_secs(30),
//!         free_bytes: 512 << 20,
//!         margin: 16 << 20,
//!     };
//!     let image = download::download(&req, &mut |on_disk| println!("{on_disk} bytes")).await?;
//!     println!("ready: {}", image.display());
//! }
//! # Ok(()) }
//! ```
//!
//! Left to the agent: the envelope's signature, the installed versions and
//! the index in `state.db`, measuring free space, running one download per
//! image at a time, campaigns and per-device progress, and handing images to
//! devices or to the gateway's installer.

pub mod download;
pub mod lwm2m;
pub mod manifest;
pub mod url;
pub mod version;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// A staged, complete image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Title (`fw_title`).
    pub title: String,
    /// Version (`fw_version`).
    pub version: String,
    /// Size in bytes (`fw_size`).
    pub size: u64,
    /// Lower-case hex SHA-256 of the bytes (`fw_checksum`).
    pub sha256: String,
    /// The file in `ready/`.
    pub path: PathBuf,
}

/// Why staging failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Title or version unusable.
    #[error(
        "{what} {value:?} must be 1-128 printable characters without '/' or control characters"
    )]
    BadName {
        /// `title` or `version`.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// The source file is empty.
    #[error("{0}: an empty file is not a firmware image")]
    Empty(PathBuf),
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
}

/// The rule for titles and versions (of staged images and of manifests):
/// 1-128 bytes, no control characters, no '/' or '\\' (they name files and
/// index rows).
pub(crate) fn name_ok(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 128
        && !value
            .chars()
            .any(|c| c.is_control() || c == '/' || c == '\\')
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// `value` as a lower-case SHA-256 hex digest, if it is 64 hex digits of
/// either case.
pub(crate) fn sha256_hex(value: &str) -> Option<String> {
    (value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| value.to_ascii_lowercase())
}

fn check_name(what: &'static str, value: &str) -> Result<(), StageError> {
    if name_ok(value) {
        Ok(())
    } else {
        Err(StageError::BadName {
            what,
            value: value.to_owned(),
        })
    }
}

/// Copies `src` into `root/staging/`, hashing it, fsyncs it, and renames it
/// into `root/ready/` (named after its hash, so two titles with the same
/// bytes share nothing and a re-stage of the same bytes is idempotent).
///
/// Fails on an unusable title/version, an empty source, or any I/O error;
/// nothing is left in `ready/` then.
pub fn stage(root: &Path, src: &Path, title: &str, version: &str) -> Result<Image, StageError> {
    check_name("title", title)?;
    check_name("version", version)?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StageError::Io { path, source }
    };
    let staging = root.join("staging");
    let ready = root.join("ready");
    fs::create_dir_all(&staging).map_err(io(&staging))?;
    fs::create_dir_all(&ready).map_err(io(&ready))?;
    let mut input = File::open(src).map_err(io(src))?;
    let tmp = staging.join(format!("incoming-{}.part", std::process::id()));
    let mut out = File::create(&tmp).map_err(io(&tmp))?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut size = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = input.read(&mut buf).map_err(io(src))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io(&tmp))?;
        size += n as u64;
    }
    if size == 0 {
        let _ = fs::remove_file(&tmp);
        return Err(StageError::Empty(src.to_owned()));
    }
    out.sync_all().map_err(io(&tmp))?;
    drop(out);
    let sha256 = hex(hash.finish().as_ref());
    let path = ready.join(format!("{sha256}.bin"));
    fs::rename(&tmp, &path).map_err(io(&path))?;
    File::open(&ready)
        .and_then(|d| d.sync_all())
        .map_err(io(&ready))?;
    Ok(Image {
        title: title.to_owned(),
        version: version.to_owned(),
        size,
        sha256,
        path,
    })
}

/// The byte range of chunk `index` of an image of `size` bytes cut into
/// chunks of `chunk_size` (`None` or 0 = the whole image as chunk 0), as
/// ThingsBoard's OTA flows number them: `(offset, len)`, with `len` 0 past
/// the end (the device asked one chunk too many and gets an empty answer).
pub fn chunk_range(size: u64, chunk_size: Option<u64>, index: u64) -> (u64, u64) {
    match chunk_size {
        None | Some(0) => {
            if index == 0 {
                (0, size)
            } else {
                (size, 0)
            }
        }
        Some(c) => {
            let offset = index.saturating_mul(c).min(size);
            (offset, c.min(size - offset))
        }
    }
}

/// Reads `len` bytes at `offset` of `path`.
///
/// Fails when the file cannot be read or is shorter than asked.
pub fn read_range(path: &Path, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let len = usize::try_from(len).map_err(|_| io::Error::other("chunk too large"))?;
    let mut out = vec![0u8; len];
    f.read_exact(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_copies_hashes_and_publishes_only_complete_images() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("fw.bin");
        let bytes: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&src, &bytes).unwrap();
        let img = stage(&dir.path().join("fw"), &src, "bench_fw.bin", "1.1").unwrap();
        assert_eq!(img.size, 5000);
        let expect: String = ring::digest::digest(&ring::digest::SHA256, &bytes)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(img.sha256, expect);
        assert_eq!(fs::read(&img.path).unwrap(), bytes);
        assert!(img.path.starts_with(dir.path().join("fw/ready")));
        assert_eq!(
            fs::read_dir(dir.path().join("fw/staging")).unwrap().count(),
            0,
            "nothing left behind in staging"
        );
    }

    #[test]
    fn bad_names_and_empty_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("empty");
        fs::write(&src, b"").unwrap();
        assert!(matches!(
            stage(dir.path(), &src, "t", "1"),
            Err(StageError::Empty(_))
        ));
        for (t, v) in [("", "1"), ("a/b", "1"), ("t", "1\n")] {
            assert!(matches!(
                stage(dir.path(), &src, t, v),
                Err(StageError::BadName { .. })
            ));
        }
        assert!(matches!(
            stage(dir.path(), &dir.path().join("missing"), "t", "1"),
            Err(StageError::Io { .. })
        ));
    }

    #[test]
    fn chunks_follow_the_thingsboard_numbering() {
        // 5000 bytes in 1024-byte chunks: 4 full, one of 904, then empty.
        assert_eq!(chunk_range(5000, Some(1024), 0), (0, 1024));
        assert_eq!(chunk_range(5000, Some(1024), 4), (4096, 904));
        assert_eq!(chunk_range(5000, Some(1024), 5), (5000, 0));
        assert_eq!(chunk_range(5000, Some(1024), u64::MAX), (5000, 0));
        assert_eq!(chunk_range(5000, None, 0), (0, 5000));
        assert_eq!(chunk_range(5000, Some(0), 0), (0, 5000));
        assert_eq!(chunk_range(5000, None, 1), (5000, 0));
    }

    #[test]
    fn ranges_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"0123456789").unwrap();
        assert_eq!(read_range(&p, 3, 4).unwrap(), b"3456");
        assert_eq!(read_range(&p, 10, 0).unwrap(), b"");
        assert!(read_range(&p, 8, 4).is_err());
    }
}
