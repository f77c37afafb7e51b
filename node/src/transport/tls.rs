//! TLS on the client port (`wss://`, `https://`) with rustls. The certificate and key are PEM
//! files (a Kubernetes `kubernetes.io/tls` Secret mounted as a directory, e.g. by
//! cert-manager); they are read again when either file changes, checked at each handshake, so
//! a rotated certificate is served to new connections without a restart. A rotation that cannot
//! be read (half written, a key that does not match) keeps the previous certificate and logs why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert_file {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("tls.key_file {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("the certificate and key in tls.cert_file / tls.key_file do not belong together: {0}")]
    Mismatch(String),
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// The served certificate, and the files' modification times it was read at.
struct Loaded {
    key: Arc<CertifiedKey>,
    stamps: (Option<SystemTime>, Option<SystemTime>),
}

/// Serves the certificate from `cert_file` / `key_file`, reading them again when they change.
#[derive(Debug)]
pub struct CertFiles {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<Arc<CertifiedKey>>,
    stamps: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load(cert_file: &Path, key_file: &Path, provider: &CryptoProvider) -> Result<Loaded, TlsError> {
    // Stamps first: a change while reading is seen at the next handshake.
    let stamps = (modified(cert_file), modified(key_file));
    let cert_error = |reason: String| TlsError::Cert { path: cert_file.display().to_string(), reason };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| cert_error(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_error("no PEM certificate in it".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| TlsError::Key { path: key_file.display().to_string(), reason: e.to_string() })?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Mismatch(e.to_string()))?;
    Ok(Loaded { key: Arc::new(certified), stamps })
}

impl CertFiles {
    /// Reads both files now: a node with a broken certificate does not start.
    pub fn open(cert_file: &Path, key_file: &Path) -> Result<Arc<CertFiles>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = load(cert_file, key_file, &provider)?;
        Ok(Arc::new(CertFiles {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            provider,
            current: Mutex::new(loaded.key),
            stamps: Mutex::new(loaded.stamps),
        }))
    }

    /// The certificate to serve, read again first if either file changed.
    fn certificate(&self) -> Arc<CertifiedKey> {
        let now = (modified(&self.cert_file), modified(&self.key_file));
        let mut stamps = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
        if *stamps != now {
            *stamps = now;
            match load(&self.cert_file, &self.key_file, &self.provider) {
                Ok(loaded) => {
                    *stamps = loaded.stamps;
                    *self.current.lock().unwrap_or_else(|p| p.into_inner()) = loaded.key;
                    tracing::info!(cert = %self.cert_file.display(), "TLS certificate reloaded");
                }
                Err(err) => {
                    tracing::warn!(%err, "TLS certificate changed but cannot be used; serving the previous one")
                }
            }
        }
        drop(stamps);
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A TLS acceptor for the client port (HTTP/1.1 only: WebSocket upgrades need it).
    pub fn acceptor(self: &Arc<Self>) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certificate())
    }
}
