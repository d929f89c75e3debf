//! TLS for tests: a throwaway certificate authority that issues server and
//! client certificates, and a TLS-terminating proxy (rustls, so the services'
//! OpenSSL clients are checked against another implementation) that puts TLS
//! in front of a plaintext server such as a test's own broker.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tokio_rustls::rustls;

/// A certificate authority of the test's own, its certificate in a PEM file.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    dir: PathBuf,
}

/// A certificate issued by a `TestCa`, with its key, in memory and in files.
pub struct Issued {
    pub cert_pem: String,
    /// PKCS#8 PEM (`BEGIN PRIVATE KEY`).
    pub key_pem: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    cert_der: rustls::pki_types::CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl TestCa {
    /// A new authority whose files go into a fresh folder under the
    /// temporary directory (removed on drop).
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(crate::stack::unique_name(name));
        std::fs::create_dir_all(&dir).expect("certificate folder");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca certificate");
        std::fs::write(dir.join("ca.pem"), cert.pem()).expect("ca.pem");
        TestCa { cert, key, dir }
    }

    /// The authority's certificate (PEM file).
    pub fn cert_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The authority's certificate (PEM).
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `common_name`, valid for the host names and IP
    /// addresses in `names`, written to `<file>.pem` and `<file>.key`.
    pub fn issue(&self, file: &str, common_name: &str, names: &[&str]) -> Issued {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("certificate params");
        params.distinguished_name.push(DnType::CommonName, common_name);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("certificate");
        let issued = Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_file: self.dir.join(format!("{file}.pem")),
            key_file: self.dir.join(format!("{file}.key")),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        };
        std::fs::write(&issued.cert_file, &issued.cert_pem).expect("certificate file");
        std::fs::write(&issued.key_file, &issued.key_pem).expect("key file");
        issued
    }

    /// The folder holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Listens on a loopback port, completes a TLS handshake with a server
/// certificate, and forwards the plaintext both ways to a target. Bound first
/// (`bind`), so that its address can be given to the target (a broker
/// advertises it), then started (`forward_to`) on a thread of its own that
/// runs until the process ends.
pub struct TlsProxy {
    pub addr: SocketAddr,
    handshakes: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    pending: Option<(std::net::TcpListener, tokio_rustls::TlsAcceptor)>,
}

impl TlsProxy {
    /// Binds a free loopback port for a proxy presenting `server`.
    pub fn bind(server: &Issued) -> Self {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![server.cert_der.clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(server.key_der.clone().into()),
            )
            .expect("server certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy port");
        listener.set_nonblocking(true).expect("nonblocking");
        TlsProxy {
            addr: listener.local_addr().expect("proxy address"),
            handshakes: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(AtomicU64::new(0)),
            pending: Some((listener, acceptor)),
        }
    }

    /// Starts accepting, forwarding every connection to `target`.
    pub fn forward_to(mut self, target: SocketAddr) -> Self {
        let Some((listener, acceptor)) = self.pending.take() else {
            return self;
        };
        let (ok, bad) = (self.handshakes.clone(), self.failed.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                while let Ok((client, _)) = listener.accept().await {
                    let (acceptor, ok, bad) = (acceptor.clone(), ok.clone(), bad.clone());
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(client).await else {
                            bad.fetch_add(1, Ordering::Relaxed);
                            return;
                        };
                        ok.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut plain) = tokio::net::TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                        }
                    });
                }
            });
        });
        self
    }

    /// TLS handshakes completed so far.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// Connections whose handshake failed (the client refused the
    /// certificate, or spoke plaintext).
    pub fn failed_handshakes(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}
