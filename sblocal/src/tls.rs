//! The broker's certificates: a self-signed CA (written to `DIR/ca.pem` for clients to trust)
//! and a server certificate for `localhost` / `127.0.0.1` signed by it.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A fresh CA and the server identity it signed.
pub struct Pki {
    /// The CA certificate in PEM, what clients trust.
    pub ca_pem: String,
    /// A rustls server configuration presenting the server certificate and the CA.
    pub server_config: Arc<rustls::ServerConfig>,
}

impl Pki {
    /// Generates a new CA and server certificate (SANs `localhost`, `127.0.0.1`, `::1`).
    pub fn generate() -> Result<Self, TlsError> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = name("sblocal local CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate()?;
        let mut server_params = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])?;
        server_params.distinguished_name = name("localhost");
        server_params.is_ca = IsCa::ExplicitNoCa;
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        // Strict X.509 verifiers (Python 3.13's default) require an authority key identifier.
        server_params.use_authority_key_identifier_extension = true;
        let server_cert = server_params.signed_by(&server_key, &issuer)?;

        let chain = vec![
            CertificateDer::from(server_cert.der().to_vec()),
            CertificateDer::from(ca_cert.der().to_vec()),
        ];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
        let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            server_config: Arc::new(server_config),
        })
    }

    /// An acceptor offering the given ALPN protocols (none for AMQP).
    pub fn acceptor(&self, alpn: &[&[u8]]) -> TlsAcceptor {
        let mut config = (*self.server_config).clone();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsAcceptor::from(Arc::new(config))
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "sblocal");
    dn
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A rustls client that trusts only the written CA completes a handshake for `localhost`.
    #[tokio::test]
    async fn clients_trusting_the_ca_connect() {
        let pki = Pki::generate().expect("pki");
        let mut roots = rustls::RootCertStore::empty();
        let ca_der = pem_to_der(&pki.ca_pem);
        roots.add(CertificateDer::from(ca_der)).expect("ca added");
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let (client_io, server_io) = tokio::io::duplex(16 * 1024);
        let acceptor = pki.acceptor(&[]);
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(server_io).await.expect("server handshake");
            tls.write_all(b"hello").await.expect("write");
            tls.flush().await.expect("flush");
        });
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = connector
            .connect(name, client_io)
            .await
            .expect("client handshake");
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"hello");
        server.await.expect("server task");
    }

    fn pem_to_der(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .expect("base64")
    }
}
