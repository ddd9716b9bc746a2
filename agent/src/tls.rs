//! Server-side TLS for the device listeners: rustls with the ring provider,
//! TLS 1.3 and 1.2, certificates and keys from PEM files, and optional client
//! certificates verified against a CA (mTLS).
//!
//! Client certificates are optional even with a CA configured: a device
//! without one still connects and authenticates with its access token.

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the server TLS configuration could not be built; each names the
/// config key whose file is at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or held nothing usable.
    #[error("{key} {}: {message}", path.display())]
    Pem {
        /// The config key, e.g. `listeners.mqtts.cert_file`.
        key: String,
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// rustls refused the combination (e.g. key does not match the certificate).
    #[error("{section}: {source}")]
    Rustls {
        /// The config section, e.g. `listeners.mqtts`.
        section: String,
        /// What rustls said.
        source: rustls::Error,
    },
    /// The client CA could not make a verifier.
    #[error("{section}.client_ca_file: {message}")]
    ClientCa {
        /// The config section.
        section: String,
        /// What went wrong.
        message: String,
    },
}

/// Where a TLS listener's PEM files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// Certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA bundle for client certificates; `None` turns mTLS off.
    pub client_ca_file: Option<PathBuf>,
}

fn certs(section: &str, key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |message: String| TlsError::Pem {
        key: format!("{section}.{key}"),
        path: path.to_owned(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in file".into()));
    }
    Ok(certs)
}

/// Builds the server configuration for the listener `section` (used in
/// error messages, e.g. `listeners.mqtts`).
///
/// Fails when a file cannot be read, holds no certificate or key, the key
/// does not match the certificate, or the client CA is unusable.
pub fn server_config(section: &str, files: &ServerTlsFiles) -> Result<ServerConfig, TlsError> {
    let chain = certs(section, "cert_file", &files.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&files.key_file).map_err(|e| TlsError::Pem {
        key: format!("{section}.key_file"),
        path: files.key_file.clone(),
        message: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let rustls_err = |source| TlsError::Rustls {
        section: section.to_owned(),
        source,
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(rustls_err)?;
    let builder = match &files.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certs(section, "client_ca_file", ca)? {
                roots.add(cert).map_err(|e| TlsError::Pem {
                    key: format!("{section}.client_ca_file"),
                    path: ca.clone(),
                    message: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::ClientCa {
                    section: section.to_owned(),
                    message: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder.with_single_cert(chain, key).map_err(rustls_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_empty_files_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let files = ServerTlsFiles {
            cert_file: dir.path().join("absent.crt"),
            key_file: empty.clone(),
            client_ca_file: None,
        };
        let e = server_config("listeners.mqtts", &files).unwrap_err();
        assert!(
            e.to_string().starts_with("listeners.mqtts.cert_file "),
            "{e}"
        );
        let files = ServerTlsFiles {
            cert_file: empty.clone(),
            ..files
        };
        let e = server_config("listeners.mqtts", &files).unwrap_err();
        assert!(e.to_string().contains("no certificate"), "{e}");
    }
}
