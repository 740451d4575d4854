//! TLS settings made into a rustls server configuration: certificate chain and key from PEM
//! files, TLS 1.3 only unless 1.2 is asked for (rustls offers 1.2 only with ECDHE key exchange
//! and AEAD ciphers), and client certificates (mTLS) checked against a CA bundle, required or
//! optional. Reading the files again builds a new configuration, which is how a running server
//! reloads renewed certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::error::{GatewayError, Result};

/// Whether a listener asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// Refuse a client without a certificate from the CA bundle.
    #[default]
    Required,
    /// Accept clients without one; a certificate, when sent, must be from the bundle.
    Optional,
}

/// What a TLS listener is configured with.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM: the server's certificate, then its chain.
    pub cert: PathBuf,
    /// PEM: the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: CAs whose client certificates are accepted (mTLS); none: no client certificates.
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
    /// Also accept TLS 1.2 (ECDHE + AEAD suites only).
    pub allow_tls12: bool,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(field: &'static str, path: &Path, message: impl std::fmt::Display) -> GatewayError {
    GatewayError::invalid(field, format!("{}: {message}", path.display()))
}

impl TlsSettings {
    /// Reads the files and builds the server configuration (HTTP/1.1 and HTTP/2 by ALPN).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .map_err(|e| tls_error("tls_cert", &self.cert, e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| tls_error("tls_cert", &self.cert, e))?;
        if certs.is_empty() {
            return Err(tls_error(
                "tls_cert",
                &self.cert,
                "no certificate in the file",
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| tls_error("tls_key", &self.key, e))?;
        let versions: &[&rustls::SupportedProtocolVersion] = if self.allow_tls12 {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| GatewayError::invalid("tls", e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(path)
                    .map_err(|e| tls_error("tls_client_ca", path, e))?
                {
                    let cert = cert.map_err(|e| tls_error("tls_client_ca", path, e))?;
                    roots
                        .add(cert)
                        .map_err(|e| tls_error("tls_client_ca", path, e))?;
                }
                if roots.is_empty() {
                    return Err(tls_error(
                        "tls_client_ca",
                        path,
                        "no certificate in the file",
                    ));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
                let verifier = match self.client_auth {
                    ClientAuth::Required => verifier,
                    ClientAuth::Optional => verifier.allow_unauthenticated(),
                }
                .build()
                .map_err(|e| tls_error("tls_client_ca", path, e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| tls_error("tls_key", &self.key, e))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The subject of a DER certificate as RFC 4514 text (`CN=app,O=Acme`), the identity a
/// client certificate stands for.
pub fn certificate_subject(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.subject().to_string())
}
