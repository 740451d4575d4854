//! TLS settings made into a rustls server configuration: certificate chain and key from PEM
//! files, TLS 1.3 only unless 1.2 is asked for (rustls offers 1.2 only with ECDHE key exchange
//! and AEAD ciphers), and client certificates (mTLS) checked against a CA bundle, required or
//! optional. Reading the files again builds a new configuration, which is how a running server
//! reloads renewed certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
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
    /// PEM: certificate revocation lists of the client CAs; a revoked client certificate
    /// fails the handshake. Read again with the certificates (SIGHUP).
    pub client_crl: Option<PathBuf>,
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
                let mut verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
                if let Some(crl_path) = &self.client_crl {
                    let crls = CertificateRevocationListDer::pem_file_iter(crl_path)
                        .map_err(|e| tls_error("tls_client_crl", crl_path, e))?
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map_err(|e| tls_error("tls_client_crl", crl_path, e))?;
                    if crls.is_empty() {
                        return Err(tls_error(
                            "tls_client_crl",
                            crl_path,
                            "no certificate revocation list in the file",
                        ));
                    }
                    verifier = verifier.with_crls(crls);
                }
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

/// The subject of a DER certificate as text (`CN=app1, O=Acme`), the identity a client
/// certificate stands for and what `[[tls.client_identities]]` bindings are compared with.
/// Each value is escaped as RFC 4514 says (`\,` `\+` `\"` `\\` `\<` `\>` `\;` `\=`, a
/// leading `#` or space, a trailing space, control characters as `\XX`), so the rendering is
/// one-to-one: a common name of `batch-jobs, O=Acme` renders as `CN=batch-jobs\, O=Acme` and
/// can never equal the two-attribute subject `CN=batch-jobs, O=Acme`. Attributes are joined as
/// the certificate orders them, RDNs by `, ` and multi-valued ones by ` + `; a value that is
/// no UTF-8, printable or IA5 string is `#` and its whole DER in hex.
pub fn certificate_subject(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    render_name(cert.subject())
}

/// What a verified client certificate shows, for `[[tls.client_identities]]` bindings to
/// compare: its subject and issuer (as [`certificate_subject`] writes them) and two digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    pub subject: String,
    pub issuer: String,
    /// SHA-256 of the whole certificate (DER), lowercase hex: this one certificate.
    pub sha256: String,
    /// SHA-256 of its SubjectPublicKeyInfo (DER), lowercase hex: any certificate for this key.
    pub public_key_sha256: String,
}

/// The [`ClientCertificate`] of a DER certificate; `None` if it does not parse.
pub fn client_certificate(der: &[u8]) -> Option<ClientCertificate> {
    use sha2::{Digest, Sha256};
    let hex = |bytes: &[u8]| {
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(ClientCertificate {
        subject: render_name(cert.subject())?,
        issuer: render_name(cert.issuer())?,
        sha256: hex(der),
        public_key_sha256: hex(cert.public_key().raw),
    })
}

/// A distinguished name as [`certificate_subject`] describes.
fn render_name(name: &x509_parser::x509::X509Name<'_>) -> Option<String> {
    use x509_parser::der_parser::asn1_rs::{Tag, ToDer};
    let registry = x509_parser::objects::oid_registry();
    let mut out = String::new();
    for (i, rdn) in name.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        for (j, attribute) in rdn.iter().enumerate() {
            if j > 0 {
                out.push_str(" + ");
            }
            // Short names only for the usual attributes (each names one OID); any other is
            // its dotted OID, so two attributes never print alike.
            match x509_parser::objects::oid2abbrev(attribute.attr_type(), registry) {
                Ok(name) if SHORT_NAMES.contains(&name) => out.push_str(name),
                _ => out.push_str(&attribute.attr_type().to_id_string()),
            }
            out.push('=');
            let value = attribute.attr_value();
            let text = matches!(
                value.tag(),
                Tag::Utf8String | Tag::PrintableString | Tag::Ia5String
            )
            .then(|| attribute.as_str().ok())
            .flatten();
            match text {
                Some(value) => escape_rfc4514(value, &mut out),
                // Any other type as RFC 4514 says: `#` and the value's whole DER (tag and
                // length too, so two types with the same bytes differ).
                None => {
                    out.push('#');
                    for byte in value.to_der_vec().ok()? {
                        out.push_str(&format!("{byte:02X}"));
                    }
                }
            }
        }
    }
    Some(out)
}

/// The attribute short names a subject is written with (RFC 4514's, and the usual others).
const SHORT_NAMES: &[&str] = &[
    "CN",
    "O",
    "OU",
    "C",
    "L",
    "ST",
    "DC",
    "UID",
    "street",
    "serialNumber",
    "emailAddress",
    "title",
    "GN",
    "SN",
    "initials",
    "pseudonym",
    "generationQualifier",
    "postalCode",
];

/// Appends `value` escaped as an RFC 4514 attribute value.
fn escape_rfc4514(value: &str, out: &mut String) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=' => {
                out.push('\\');
                out.push(c);
            }
            '#' | ' ' if i == 0 => {
                out.push('\\');
                out.push(c);
            }
            ' ' if i == last => out.push_str("\\ "),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for byte in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\{byte:02X}"));
                }
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject_of(attributes: &[(rcgen::DnType, &str)]) -> Option<String> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).ok()?;
        for (kind, value) in attributes {
            params.distinguished_name.push(kind.clone(), *value);
        }
        let key = rcgen::KeyPair::generate().ok()?;
        let cert = params.self_signed(&key).ok()?;
        certificate_subject(cert.der())
    }

    #[test]
    fn subjects_render_one_to_one() {
        use rcgen::DnType::{CommonName, OrganizationName};
        assert_eq!(
            subject_of(&[(CommonName, "batch-jobs"), (OrganizationName, "Acme")]).as_deref(),
            Some("CN=batch-jobs, O=Acme")
        );
        // One attribute whose value looks like two: escaped, so it is a different subject.
        assert_eq!(
            subject_of(&[(CommonName, "batch-jobs, O=Acme")]).as_deref(),
            Some("CN=batch-jobs\\, O\\=Acme")
        );
        assert_eq!(
            subject_of(&[(CommonName, " #a+b;<c>\"q\"\\ ")]).as_deref(),
            Some("CN=\\ #a\\+b\\;\\<c\\>\\\"q\\\"\\\\\\ ")
        );
        assert_eq!(
            subject_of(&[(CommonName, "#tag\nline")]).as_deref(),
            Some("CN=\\#tag\\0Aline")
        );
    }
}
