//! The Debian package on this machine: `packaging/deb/build.sh` packs the
//! test build of sluice, then dpkg installs it, upgrades it, removes it and
//! purges it, and each step is checked on the real file system (files,
//! `sluice --version`, the system user, the conffile, the state directory).
//!
//! It writes /usr/bin/sluice, /etc/sluice and /var/lib/sluice, so it needs
//! root and dpkg (skipped without them, a failure when CI=true), refuses to
//! touch a machine where any of those already exist, holds a machine-wide
//! lock against a concurrent run, and purges in a drop guard so that a
//! failed assertion leaves the machine as it found it.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod harness;

use harness::{SLUICE, pause};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const CONFFILE: &str = "/etc/sluice/sluice.toml";
const STATE_DIR: &str = "/var/lib/sluice";
/// Everything the package installs besides the conffile.
const FILES: &[&str] = &[
    "/usr/bin/sluice",
    "/usr/lib/systemd/system/sluice.service",
    "/usr/lib/systemd/system/sluice-update@.service",
    "/usr/lib/sysusers.d/sluice.conf",
    "/usr/lib/tmpfiles.d/sluice.conf",
    "/usr/share/polkit-1/rules.d/50-sluice-update.rules",
    "/usr/share/doc/sluice/copyright",
];

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// dpkg with stdin closed (a conffile prompt is then an error) and retries
/// while another process holds the dpkg lock.
fn dpkg(args: &[&str]) -> Output {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let out = run(Command::new("dpkg")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"));
        if out.status.success() || !text(&out).contains("lock") || Instant::now() > end {
            return out;
        }
        pause(Duration::from_millis(250));
    }
}

fn dpkg_ok(args: &[&str]) -> String {
    let out = dpkg(args);
    assert!(out.status.success(), "dpkg {args:?}:\n{}", text(&out));
    text(&out)
}

/// `dpkg-query`'s status abbreviation and version of sluice ("ii 0.1.0"),
/// or None when dpkg does not know the package.
fn package_state() -> Option<String> {
    let out = run(Command::new("dpkg-query").args([
        "-W",
        "-f",
        "${db:Status-Abbrev}${Version}",
        "sluice",
    ]));
    let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !s.starts_with("un")).then_some(s)
}

fn uid_of(user: &str) -> Option<u32> {
    let out = run(Command::new("getent").args(["passwd", user]));
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    out.status
        .success()
        .then(|| line.split(':').nth(2)?.parse().ok())
        .flatten()
}

/// Why this machine cannot run the test, if it cannot.
fn unable() -> Option<String> {
    let id = run(Command::new("id").arg("-u"));
    if String::from_utf8_lossy(&id.stdout).trim() != "0" {
        return Some("needs root (dpkg -i)".into());
    }
    if Command::new("dpkg").arg("--version").output().is_err() {
        return Some("dpkg not found".into());
    }
    None
}

/// Why the test must not touch this machine (sluice is installed), if so.
fn occupied() -> Option<String> {
    if let Some(state) = package_state() {
        return Some(format!("a sluice package is already installed ({state})"));
    }
    ["/usr/bin/sluice", "/etc/sluice", STATE_DIR]
        .iter()
        .find(|p| Path::new(p).exists())
        .map(|p| format!("{p} exists; not touching a real installation"))
}

/// Puts the machine back as it was: purges the package, removes what the
/// test may have left, and the system user if the test created it.
struct Restore {
    user_existed: bool,
}

impl Drop for Restore {
    fn drop(&mut self) {
        if package_state().is_some() {
            let out = dpkg(&["--purge", "sluice"]);
            if !out.status.success() {
                eprintln!("restore: dpkg --purge sluice failed:\n{}", text(&out));
            }
        }
        // occupied() saw neither of them before the test.
        let _ = fs::remove_dir_all("/etc/sluice");
        let _ = fs::remove_dir_all(STATE_DIR);
        if !self.user_existed && uid_of("sluice").is_some() {
            let _ = run(Command::new("userdel").arg("sluice"));
            let _ = run(Command::new("groupdel").arg("sluice"));
        }
    }
}

/// Runs packaging/deb/build.sh on the test build; returns the .deb.
fn build_deb(out_dir: &Path, version: Option<&str>) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/deb/build.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script)
        .args(["--bin", SLUICE, "--compress", "gzip", "--out"])
        .arg(out_dir);
    if let Some(v) = version {
        cmd.args(["--version", v]);
    }
    let out = run(&mut cmd);
    assert!(out.status.success(), "build.sh:\n{}", text(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(stdout.lines().last().unwrap())
}

fn field(deb: &Path, name: &str) -> String {
    let out = run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name));
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn assert_installed(version: &str) {
    assert_eq!(
        package_state().as_deref(),
        Some(format!("ii {version}").as_str())
    );
    for f in FILES.iter().chain([&CONFFILE]) {
        assert!(Path::new(f).is_file(), "{f} not installed");
    }
    let mode = fs::metadata("/usr/bin/sluice")
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
    let out = run(Command::new("/usr/bin/sluice").arg("--version"));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("sluice {VERSION}")
    );
    // The default configuration the package ships validates as installed.
    let out = run(Command::new("/usr/bin/sluice")
        .args(["--config", CONFFILE, "check-config"])
        .env_remove("SLUICE_CONFIG"));
    assert!(
        out.status.success(),
        "check-config {CONFFILE}:\n{}",
        text(&out)
    );
    // postinst: the system user (systemd-sysusers or adduser) and its state
    // directory (systemd-tmpfiles or install -d), 0750 sluice:sluice.
    let uid = uid_of("sluice").expect("postinst created no sluice user");
    let st = fs::metadata(STATE_DIR).expect("postinst created no /var/lib/sluice");
    assert!(st.is_dir());
    assert_eq!(st.uid(), uid, "{STATE_DIR} owner");
    assert_eq!(st.mode() & 0o7777, 0o750, "{STATE_DIR} mode");
}

#[test]
fn deb_installs_upgrades_keeps_edited_conffile_and_purges_cleanly() {
    let skip = |why: String| {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the package test cannot run under CI: {why}"
        );
        eprintln!("SKIPPED deb_installs_upgrades_keeps_edited_conffile_and_purges_cleanly: {why}");
    };
    if let Some(why) = unable() {
        return skip(why);
    }
    // One run at a time on this machine (another checkout's suite, say).
    let lock = fs::File::create("/tmp/sluice-package-test.lock").unwrap();
    lock.lock().unwrap();
    if let Some(why) = occupied() {
        return skip(why);
    }
    let _restore = Restore {
        user_existed: uid_of("sluice").is_some(),
    };
    let dir = tempfile::tempdir().unwrap();
    let arch = String::from_utf8(run(Command::new("dpkg").arg("--print-architecture")).stdout)
        .unwrap()
        .trim()
        .to_owned();

    // The package as built: name, control fields, conffile list.
    let deb = build_deb(dir.path(), None);
    assert_eq!(
        deb.file_name().unwrap().to_str().unwrap(),
        format!("sluice_{VERSION}_{arch}.deb")
    );
    assert_eq!(field(&deb, "Package"), "sluice");
    assert_eq!(field(&deb, "Version"), VERSION);
    assert_eq!(field(&deb, "Architecture"), arch);
    let depends = field(&deb, "Depends");
    assert!(depends.starts_with("libc6 (>= 2."), "Depends: {depends}");
    let conffiles = run(Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(
        String::from_utf8_lossy(&conffiles.stdout),
        format!("{CONFFILE}\n")
    );
    let upgrade_version = format!("{VERSION}+pkgtest1");
    let deb2 = build_deb(dir.path(), Some(&upgrade_version));

    // Install.
    dpkg_ok(&["--install", deb.to_str().unwrap()]);
    assert_installed(VERSION);
    let packaged = fs::metadata("/usr/bin/sluice").unwrap().len();
    assert!(
        packaged < fs::metadata(SLUICE).unwrap().len(),
        "the packaged binary is not stripped ({packaged} bytes)"
    );

    // The operator edits the configuration; the daemon has queued data.
    let edited = format!(
        "{}\n# edited by the package test\n",
        fs::read_to_string(CONFFILE).unwrap()
    );
    fs::write(CONFFILE, &edited).unwrap();
    let queued = Path::new(STATE_DIR).join("outbox.db");
    fs::write(&queued, b"not really an outbox").unwrap();

    // Upgrade: no conffile prompt (stdin is closed), the edit and the data stay.
    dpkg_ok(&["--install", deb2.to_str().unwrap()]);
    assert_installed(&upgrade_version);
    assert_eq!(fs::read_to_string(CONFFILE).unwrap(), edited);
    assert!(queued.exists(), "an upgrade deleted the outbox");

    // Remove: the program goes, configuration and data stay.
    dpkg_ok(&["--remove", "sluice"]);
    assert_eq!(
        package_state().as_deref(),
        Some(format!("rc {upgrade_version}").as_str())
    );
    for f in FILES {
        assert!(!Path::new(f).exists(), "{f} left after dpkg --remove");
    }
    assert_eq!(fs::read_to_string(CONFFILE).unwrap(), edited);
    assert!(queued.exists(), "dpkg --remove deleted the outbox");

    // Purge: nothing left.
    dpkg_ok(&["--purge", "sluice"]);
    assert_eq!(package_state(), None);
    for f in FILES.iter().chain([&CONFFILE, &"/etc/sluice", &STATE_DIR]) {
        assert!(!Path::new(f).exists(), "{f} left after dpkg --purge");
    }
}
