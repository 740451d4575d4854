//! TLS and mTLS with real handshakes: certificates made by rcgen, a rustls client speaking
//! HTTP/1.1 by hand (so the test controls versions and client certificates exactly).

use std::path::Path;
use std::sync::Arc;

use enclave_gateway::{
    certificate_subject, client_certificate, Authenticator, CertificateBinding, ClientAuth,
    ModelScope, Roles, TlsSettings,
};
use enclave_server::{Access, AppState, TlsConfigHandle, TlsListener};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use crate::server_config;

struct Issued {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn new_ca(name: &str) -> Issued {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Issued { cert, key }
}

fn leaf(names: &[&str], cn: &str, org: Option<&str>, issuer: &Issued) -> Issued {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    if let Some(org) = org {
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer.cert, &issuer.key).unwrap();
    Issued { cert, key }
}

struct Pki {
    dir: tempfile::TempDir,
    ca: Issued,
    server: Issued,
    client: Issued,
    stranger: Issued,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("Enclave test CA");
    let server = leaf(&["localhost", "127.0.0.1"], "enclave", None, &ca);
    let client = leaf(&[], "app1", Some("Acme"), &ca);
    let other_ca = new_ca("Another CA");
    let stranger = leaf(&[], "app1", Some("Acme"), &other_ca);
    write(dir.path(), "ca.pem", &ca.cert.pem());
    write_server(dir.path(), &server);
    Pki {
        dir,
        ca,
        server,
        client,
        stranger,
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn write_server(dir: &Path, server: &Issued) {
    write(dir, "server.pem", &server.cert.pem());
    write(dir, "server.key", &server.key.serialize_pem());
}

fn settings(pki: &Pki, client_auth: Option<ClientAuth>) -> TlsSettings {
    TlsSettings {
        cert: pki.dir.path().join("server.pem"),
        key: pki.dir.path().join("server.key"),
        client_ca: client_auth.map(|_| pki.dir.path().join("ca.pem")),
        client_auth: client_auth.unwrap_or_default(),
        client_crl: None,
        allow_tls12: false,
    }
}

/// A binding of the viewer role in the default tenant, naming nothing yet.
fn viewer() -> CertificateBinding {
    CertificateBinding {
        subject: None,
        issuer: None,
        sha256: None,
        public_key_sha256: None,
        tenant: "default".into(),
        role: "viewer".into(),
        models: ModelScope::all(),
    }
}

/// A TLS server (no model loaded: `/livez` and `/v1/models` answer without one), with the
/// good client's subject bound to the viewer role.
async fn serve(pki: &Pki, tls: TlsSettings) -> (String, TlsConfigHandle, tempfile::TempDir) {
    let subject = certificate_subject(pki.client.cert.der()).unwrap();
    let binding = CertificateBinding {
        subject: Some(subject),
        ..viewer()
    };
    serve_bound(tls, vec![binding]).await
}

async fn serve_bound(
    tls: TlsSettings,
    bindings: Vec<CertificateBinding>,
) -> (String, TlsConfigHandle, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let store = crate::test_store(data.path()).await;
    let authenticator = Authenticator::new(store, Roles::default())
        .with_certificates(bindings)
        .unwrap();
    let handle = TlsConfigHandle::new(tls.server_config().unwrap());
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = tcp.local_addr().unwrap().to_string();
    let listener = TlsListener::new(tcp, handle.clone()).unwrap();
    let state = AppState::new(server_config(), Access::Keys(Arc::new(authenticator)));
    tokio::spawn(enclave_server::serve_tls(
        listener,
        state,
        std::future::pending(),
    ));
    (address, handle, data)
}

struct Client {
    versions: &'static [&'static rustls::SupportedProtocolVersion],
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
}

fn identity(issued: &Issued) -> Option<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    Some((
        issued.cert.der().clone(),
        PrivateKeyDer::try_from(issued.key.serialize_der()).unwrap(),
    ))
}

/// What a GET of `path` returned: the HTTP status, the negotiated version and the server's
/// certificate; `Err` when the handshake or the exchange failed.
async fn get(
    address: &str,
    pki: &Pki,
    client: Client,
    path: &str,
) -> Result<(u16, rustls::ProtocolVersion, Vec<u8>), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.cert.der().clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(client.versions)
        .unwrap()
        .with_root_certificates(roots);
    let config = match client.identity {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(address).await.unwrap();
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // `path` may name another method first: `POST /tokenize` (with an empty JSON body).
    let (method, path) = path.split_once(' ').unwrap_or(("GET", path));
    let body = if method == "GET" { "" } else { "{}" };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no HTTP response: {text:?}"))?;
    let (_, session) = tls.get_ref();
    let version = session.protocol_version().unwrap();
    let server_cert = session.peer_certificates().unwrap()[0].to_vec();
    Ok((status, version, server_cert))
}

const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
const TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];

#[tokio::test]
async fn tls13_is_served_and_tls12_refused() {
    let pki = pki();
    let (address, _, _data) = serve(&pki, settings(&pki, None)).await;
    let plain = Client {
        versions: TLS13,
        identity: None,
    };
    let (status, version, _) = get(&address, &pki, plain, "/livez").await.unwrap();
    assert_eq!((status, version), (200, rustls::ProtocolVersion::TLSv1_3));
    // Credentials are still required over TLS.
    let plain = Client {
        versions: TLS13,
        identity: None,
    };
    assert_eq!(
        get(&address, &pki, plain, "/v1/models").await.unwrap().0,
        401
    );
    let old = Client {
        versions: TLS12,
        identity: None,
    };
    let refused = get(&address, &pki, old, "/livez").await;
    assert!(refused.is_err(), "a TLS 1.2 client was served: {refused:?}");
}

#[tokio::test]
async fn with_mtls_required_only_certificates_of_the_ca_get_in() {
    let pki = pki();
    let (address, _, _data) = serve(&pki, settings(&pki, Some(ClientAuth::Required))).await;
    for (what, identity) in [
        ("no certificate", None),
        ("another CA", identity(&pki.stranger)),
    ] {
        let client = Client {
            versions: TLS13,
            identity,
        };
        let refused = get(&address, &pki, client, "/livez").await;
        assert!(refused.is_err(), "{what}: {refused:?}");
    }
    // The good certificate's subject is bound to the viewer role: models:read, no inference.
    let good = || Client {
        versions: TLS13,
        identity: identity(&pki.client),
    };
    assert_eq!(
        get(&address, &pki, good(), "/v1/models").await.unwrap().0,
        200
    );
    assert_eq!(
        get(&address, &pki, good(), "POST /tokenize")
            .await
            .unwrap()
            .0,
        403
    );
    let subject = certificate_subject(pki.client.cert.der()).unwrap();
    assert!(
        subject.contains("CN=app1") && subject.contains("O=Acme"),
        "{subject}"
    );
}

#[tokio::test]
async fn with_mtls_optional_a_client_without_a_certificate_needs_a_key() {
    let pki = pki();
    let (address, _, _data) = serve(&pki, settings(&pki, Some(ClientAuth::Optional))).await;
    let anonymous = Client {
        versions: TLS13,
        identity: None,
    };
    assert_eq!(
        get(&address, &pki, anonymous, "/v1/models")
            .await
            .unwrap()
            .0,
        401
    );
    let certified = Client {
        versions: TLS13,
        identity: identity(&pki.client),
    };
    assert_eq!(
        get(&address, &pki, certified, "/v1/models")
            .await
            .unwrap()
            .0,
        200
    );
    let stranger = Client {
        versions: TLS13,
        identity: identity(&pki.stranger),
    };
    assert!(get(&address, &pki, stranger, "/livez").await.is_err());
}

#[tokio::test]
async fn a_reloaded_certificate_serves_new_connections() {
    let pki = pki();
    let tls = settings(&pki, None);
    let (address, handle, _data) = serve(&pki, tls.clone()).await;
    let client = || Client {
        versions: TLS13,
        identity: None,
    };
    let (_, _, before) = get(&address, &pki, client(), "/livez").await.unwrap();
    assert_eq!(before, pki.server.cert.der().to_vec());
    let renewed = leaf(
        &["localhost", "127.0.0.1"],
        "enclave-renewed",
        None,
        &pki.ca,
    );
    write_server(pki.dir.path(), &renewed);
    handle.replace(tls.server_config().unwrap());
    let (status, _, after) = get(&address, &pki, client(), "/livez").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(after, renewed.cert.der().to_vec());
    // A broken file is a clear error, naming it.
    write(pki.dir.path(), "server.key", "not a key");
    let error = tls.server_config().unwrap_err().to_string();
    assert!(error.contains("server.key"), "{error}");
}

/// Silent connections from one address hold at most eight TLS handshakes: the ninth from it is
/// closed at once, and a client from another address completes its handshake meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_of_one_address_cannot_take_every_handshake() {
    let pki = pki();
    let (address, _, _data) = serve(&pki, settings(&pki, None)).await;
    let to: std::net::SocketAddr = address.parse().unwrap();
    let connect_from = |from: &'static str| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(std::net::SocketAddr::new(from.parse().unwrap(), 0))
            .unwrap();
        socket.connect(to).await.unwrap()
    };
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(connect_from("127.0.0.2").await);
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut ninth = connect_from("127.0.0.2").await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), ninth.read(&mut buf))
        .await
        .expect("the ninth silent connection was not closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let plain = Client {
        versions: TLS13,
        identity: None,
    };
    let (status, _, _) = get(&address, &pki, plain, "/livez").await.unwrap();
    assert_eq!(status, 200);
    drop(silent);
}

/// With a CRL (`tls.client_crl`), a client certificate the CA revoked fails the handshake; one
/// it did not revoke gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_certificate_fails_the_handshake() {
    let pki = pki();
    let issue = |serial: u64| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "app");
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &pki.ca.cert, &pki.ca.key).unwrap();
        Issued { cert, key }
    };
    let (revoked, kept) = (issue(42), issue(43));
    let crl = rcgen::CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2026, 1, 1),
        next_update: rcgen::date_time_ymd(2036, 1, 1),
        crl_number: rcgen::SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![rcgen::RevokedCertParams {
            serial_number: rcgen::SerialNumber::from(42u64),
            revocation_time: rcgen::date_time_ymd(2026, 6, 1),
            reason_code: Some(rcgen::RevocationReason::KeyCompromise),
            invalidity_date: None,
        }],
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&pki.ca.cert, &pki.ca.key)
    .unwrap();
    write(pki.dir.path(), "ca.crl", &crl.pem().unwrap());
    let tls = TlsSettings {
        client_crl: Some(pki.dir.path().join("ca.crl")),
        ..settings(&pki, Some(ClientAuth::Required))
    };
    let (address, _, _data) = serve(&pki, tls).await;
    let with = |issued: &Issued| Client {
        versions: TLS13,
        identity: identity(issued),
    };
    let refused = get(&address, &pki, with(&revoked), "/livez").await;
    assert!(
        refused.is_err(),
        "a revoked certificate got in: {refused:?}"
    );
    let (status, _, _) = get(&address, &pki, with(&kept), "/livez").await.unwrap();
    assert_eq!(status, 200);
}

/// With two trusted CAs issuing the same subject, a binding that names its issuer admits only
/// that CA's certificate; a fingerprint binding admits only that certificate (or key), not a
/// second one with the same subject from the same CA.
#[tokio::test]
async fn bindings_by_issuer_or_fingerprint_admit_only_what_they_name() {
    let pki = pki();
    let other_ca = new_ca("Another CA");
    // Both CAs trusted; each issues CN=app1, O=Acme; the first CA a second one too.
    write(
        pki.dir.path(),
        "ca.pem",
        &format!("{}{}", pki.ca.cert.pem(), other_ca.cert.pem()),
    );
    let same_subject_other_ca = leaf(&[], "app1", Some("Acme"), &other_ca);
    let same_subject_same_ca = leaf(&[], "app1", Some("Acme"), &pki.ca);
    let ours = client_certificate(pki.client.cert.der()).unwrap();
    assert_eq!(
        ours.subject,
        client_certificate(same_subject_other_ca.cert.der())
            .unwrap()
            .subject
    );
    let cases = [
        (
            "subject and issuer",
            CertificateBinding {
                subject: Some(ours.subject.clone()),
                issuer: Some(ours.issuer.clone()),
                ..viewer()
            },
            [200, 401, 200],
        ),
        (
            "certificate fingerprint",
            CertificateBinding {
                sha256: Some(ours.sha256.clone()),
                ..viewer()
            },
            [200, 401, 401],
        ),
        (
            "public-key fingerprint",
            CertificateBinding {
                public_key_sha256: Some(ours.public_key_sha256.clone()),
                ..viewer()
            },
            [200, 401, 401],
        ),
        (
            "subject alone",
            CertificateBinding {
                subject: Some(ours.subject.clone()),
                ..viewer()
            },
            [200, 200, 200],
        ),
    ];
    for (what, binding, expected) in cases {
        let tls = settings(&pki, Some(ClientAuth::Required));
        let (address, _, _data) = serve_bound(tls, vec![binding]).await;
        let mut got = [0; 3];
        for (slot, who) in
            got.iter_mut()
                .zip([&pki.client, &same_subject_other_ca, &same_subject_same_ca])
        {
            let client = Client {
                versions: TLS13,
                identity: identity(who),
            };
            *slot = get(&address, &pki, client, "/v1/models").await.unwrap().0;
        }
        assert_eq!(got, expected, "{what}");
    }
    // A binding naming only an issuer, or a malformed fingerprint, is refused at start.
    let data = tempfile::tempdir().unwrap();
    let store = crate::test_store(data.path()).await;
    for binding in [
        CertificateBinding {
            issuer: Some(ours.issuer.clone()),
            ..viewer()
        },
        CertificateBinding {
            sha256: Some("AB:CD".into()),
            ..viewer()
        },
    ] {
        let refused = Authenticator::new(store.clone(), Roles::default())
            .with_certificates(vec![binding])
            .err()
            .unwrap()
            .to_string();
        assert!(refused.contains("client_identities"), "{refused}");
    }
}
