//! The uplink's TLS material (CA bundle, client certificate and key, ALPN)
//! and when to read it again.
//!
//! Client certificates rotate on disk while the daemon runs (an ACME client,
//! a provisioning job, cert-manager). Before each connection attempt the
//! uplink compares every file's length, modification time and inode with
//! those it last loaded; when any differs it rebuilds the rustls
//! configuration, so the next connection presents the new certificate
//! without a restart. Files that do not load (half-written, a key that does
//! not match the certificate) keep the previous configuration; the failure is
//! reported once per change of the files and tried again when they change
//! again. The stamps are taken before the files are read: a change that lands
//! during the read is seen as a change the next time.

use crate::certificate;
use crate::uplink::{UplinkError, UplinkTls};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl FileStamp {
    fn read(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let inode = 0;
        Some(Self {
            len: m.len(),
            modified: m.modified().ok(),
            inode,
        })
    }
}

/// The stamps of the CA bundle, client certificate and key (`None`: not
/// configured or not readable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stamps([Option<FileStamp>; 3]);

impl Stamps {
    fn read(tls: &UplinkTls) -> Self {
        let (cert, key) = match &tls.client_cert {
            Some((c, k)) => (FileStamp::read(c), FileStamp::read(k)),
            None => (None, None),
        };
        Self([FileStamp::read(&tls.ca_file), cert, key])
    }
}

/// Whether to rebuild the TLS configuration before a connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reload {
    /// The files are those in use, or those that already failed to load.
    Keep,
    /// The files changed since they were last loaded or tried.
    Rebuild,
}

/// Decides from the stamps of the files in use (`loaded`), of the last set
/// that failed to load (`failed`) and of the files now (`now`).
pub(crate) fn decide(loaded: &Stamps, failed: Option<&Stamps>, now: &Stamps) -> Reload {
    if now == loaded || failed == Some(now) {
        Reload::Keep
    } else {
        Reload::Rebuild
    }
}

/// The TLS configuration in use and what it was built from.
#[derive(Clone)]
pub(crate) struct Material {
    /// What rumqttc connects with.
    pub(crate) config: Arc<rustls::ClientConfig>,
    /// The client certificate's `notAfter` (unix seconds), if there is one
    /// and it could be read.
    pub(crate) not_after: Option<i64>,
    loaded: Stamps,
    failed: Option<Stamps>,
}

/// What [`Material::refresh`] did.
#[derive(Debug)]
pub(crate) enum Refreshed {
    /// Nothing changed (or the change already failed once).
    Unchanged,
    /// The files changed and the new configuration is in use.
    Reloaded,
    /// The files changed but do not load; the previous configuration stays.
    Failed(UplinkError),
}

impl Material {
    /// Reads the files and builds the configuration.
    ///
    /// Fails as [`tls_client_config`] does.
    pub(crate) fn load(tls: &UplinkTls) -> Result<Self, UplinkError> {
        let loaded = Stamps::read(tls);
        let (config, not_after) = build(tls)?;
        Ok(Self {
            config: Arc::new(config),
            not_after,
            loaded,
            failed: None,
        })
    }

    /// Rebuilds the configuration if the files changed (blocking file I/O).
    pub(crate) fn refresh(&mut self, tls: &UplinkTls) -> Refreshed {
        let now = Stamps::read(tls);
        if decide(&self.loaded, self.failed.as_ref(), &now) == Reload::Keep {
            return Refreshed::Unchanged;
        }
        match build(tls) {
            Ok((config, not_after)) => {
                self.config = Arc::new(config);
                self.not_after = not_after;
                self.loaded = now;
                self.failed = None;
                Refreshed::Reloaded
            }
            Err(e) => {
                self.failed = Some(now);
                Refreshed::Failed(e)
            }
        }
    }
}

/// Builds the rustls client configuration: ring provider, TLS 1.3 and 1.2
/// only, the configured ALPN protocols.
///
/// Fails when a PEM file cannot be read or holds no usable certificate/key,
/// or rustls rejects the combination (e.g. a key that does not match the
/// certificate).
pub fn tls_client_config(tls: &UplinkTls) -> Result<rustls::ClientConfig, UplinkError> {
    build(tls).map(|(config, _)| config)
}

fn build(tls: &UplinkTls) -> Result<(rustls::ClientConfig, Option<i64>), UplinkError> {
    let pem_err = |what, path: &Path, message: String| UplinkError::Pem {
        what,
        path: path.to_owned(),
        message,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&tls.ca_file)
        .map_err(|e| pem_err("cloud.ca_file", &tls.ca_file, e.to_string()))?;
    for cert in certs {
        let cert = cert.map_err(|e| pem_err("cloud.ca_file", &tls.ca_file, e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| pem_err("cloud.ca_file", &tls.ca_file, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(pem_err(
            "cloud.ca_file",
            &tls.ca_file,
            "no certificate in file".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots);
    let (mut config, not_after) = match &tls.client_cert {
        None => (builder.with_no_client_auth(), None),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| pem_err("cloud.cert_file", cert, e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_err("cloud.cert_file", cert, e.to_string()))?;
            let Some(leaf) = chain.first() else {
                return Err(pem_err(
                    "cloud.cert_file",
                    cert,
                    "no certificate in file".into(),
                ));
            };
            let not_after = certificate::not_after(leaf);
            if not_after.is_none() {
                tracing::debug!(path = %cert.display(), "cannot read the client certificate's notAfter");
            }
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| pem_err("cloud.key_file", key, e.to_string()))?;
            (builder.with_client_auth_cert(chain, key)?, not_after)
        }
    };
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok((config, not_after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    fn stamp(len: u64, inode: u64) -> Option<FileStamp> {
        Some(FileStamp {
            len,
            modified: Some(SystemTime::UNIX_EPOCH),
            inode,
        })
    }

    #[test]
    fn reload_decision_follows_the_stamps() {
        let a = Stamps([stamp(10, 1), stamp(20, 2), stamp(30, 3)]);
        let rotated = Stamps([stamp(10, 1), stamp(20, 4), stamp(30, 5)]);
        let half = Stamps([stamp(10, 1), stamp(21, 4), stamp(30, 3)]);
        assert_eq!(decide(&a, None, &a.clone()), Reload::Keep);
        assert_eq!(decide(&a, None, &rotated), Reload::Rebuild);
        // A set that failed is not tried (nor reported) again…
        assert_eq!(decide(&a, Some(&half), &half.clone()), Reload::Keep);
        // …until the files change once more.
        assert_eq!(decide(&a, Some(&half), &rotated), Reload::Rebuild);
        // A file that went away is a change too (and will fail to load).
        let gone = Stamps([stamp(10, 1), None, stamp(30, 3)]);
        assert_eq!(decide(&a, None, &gone), Reload::Rebuild);
    }

    struct Ca {
        dir: PathBuf,
    }

    fn openssl(args: &[&str], dir: &Path) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl must be installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    impl Ca {
        fn new(dir: &Path) -> Self {
            openssl(
                &[
                    "req", "-x509", "-newkey", "ed25519", "-nodes", "-days", "2", "-subj",
                    "/CN=ca", "-keyout", "ca.key", "-out", "ca.crt",
                ],
                dir,
            );
            Self {
                dir: dir.to_owned(),
            }
        }

        /// A client certificate valid for `days`, as `name.crt`/`name.key`.
        fn client(&self, name: &str, days: u32) -> (PathBuf, PathBuf) {
            std::fs::write(self.dir.join("ext"), "extendedKeyUsage=clientAuth\n").unwrap();
            let (crt, key, csr) = (
                format!("{name}.crt"),
                format!("{name}.key"),
                format!("{name}.csr"),
            );
            openssl(
                &[
                    "req", "-newkey", "ed25519", "-nodes", "-subj", "/CN=gw", "-keyout", &key,
                    "-out", &csr,
                ],
                &self.dir,
            );
            openssl(
                &[
                    "x509",
                    "-req",
                    "-days",
                    &days.to_string(),
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-extfile",
                    "ext",
                    "-out",
                    &crt,
                ],
                &self.dir,
            );
            (self.dir.join(crt), self.dir.join(key))
        }
    }

    /// Replaces `to` by `from` the way rotation tools do (write + rename).
    fn rotate(from: &Path, to: &Path) {
        let tmp = to.with_extension("tmp");
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    }

    #[test]
    fn a_rotated_client_certificate_is_loaded_and_a_broken_one_keeps_the_old() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::new(tmp.path());
        let (c1, k1) = ca.client("one", 2);
        let (c2, k2) = ca.client("two", 30);
        let (cert, key) = (tmp.path().join("gw.crt"), tmp.path().join("gw.key"));
        rotate(&c1, &cert);
        rotate(&k1, &key);
        let tls = UplinkTls {
            ca_file: tmp.path().join("ca.crt"),
            client_cert: Some((cert.clone(), key.clone())),
            alpn: vec!["x-amzn-mqtt-ca".into()],
        };
        let mut m = Material::load(&tls).unwrap();
        assert_eq!(m.config.alpn_protocols, vec![b"x-amzn-mqtt-ca".to_vec()]);
        let first = m.not_after.unwrap();
        assert!(matches!(m.refresh(&tls), Refreshed::Unchanged));

        // The certificate alone: it does not match the key in place.
        rotate(&c2, &cert);
        assert!(matches!(m.refresh(&tls), Refreshed::Failed(_)));
        assert_eq!(m.not_after, Some(first));
        assert!(matches!(m.refresh(&tls), Refreshed::Unchanged));

        // Then the key: the pair loads.
        rotate(&k2, &key);
        assert!(matches!(m.refresh(&tls), Refreshed::Reloaded));
        let second = m.not_after.unwrap();
        assert!(
            (second - first - 28 * 86_400).abs() < 60,
            "{first} then {second}"
        );
        assert_eq!(m.config.alpn_protocols, vec![b"x-amzn-mqtt-ca".to_vec()]);

        // Garbage keeps the working pair.
        std::fs::write(&cert, "not a certificate").unwrap();
        assert!(matches!(m.refresh(&tls), Refreshed::Failed(_)));
        assert_eq!(m.not_after, Some(second));
    }
}
