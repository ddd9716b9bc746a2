//! sluice-firmware: firmware staging for the devices behind the gateway.
//!
//! Built so far: the **image store** — an image file copied into
//! `state_dir/firmware/staging/`, hashed (SHA-256) while it is copied,
//! fsynced, and renamed into `state_dir/firmware/ready/` only when complete,
//! so a crash never leaves a partial image in `ready/` — and the chunk
//! arithmetic of ThingsBoard's OTA flows ([`chunk_range`]). The agent keeps
//! the index (title, version → file) in `state.db` and serves chunks over
//! MQTT (`v2/fw/request/{r}/chunk/{k}`).
//!
//! **Not built yet** (issue "Firmware staging"): signed manifests from the
//! cloud, resumable HTTPS downloads, anti-rollback, campaigns by device
//! type, per-device progress tracking, HTTP and CoAP serving, gateway
//! self-update hooks.

use sha2::{Digest, Sha256};
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

fn check_name(what: &'static str, value: &str) -> Result<(), StageError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && !value
            .chars()
            .any(|c| c.is_control() || c == '/' || c == '\\');
    if ok {
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
    let mut hash = Sha256::new();
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
    let sha256: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
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
        let expect: String = Sha256::digest(&bytes)
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
