//! TLS for the replication connection: rustls (ring) configured per `sslmode`, and the
//! `tls-server-end-point` channel-binding hash for SCRAM-SHA-256-PLUS.
//!
//! | sslmode      | chain checked | host name checked |
//! |--------------|---------------|-------------------|
//! | prefer       | no            | no                |
//! | require      | no (yes with `sslrootcert`, like libpq) | no |
//! | verify-ca    | yes           | no                |
//! | verify-full  | yes           | yes               |
//!
//! `prefer`/`require` accept any certificate on purpose: that is what libpq does, and what
//! users of those modes expect. They protect against passive eavesdropping only; an active
//! attacker can impersonate the server. Operators who need more use `verify-full`. The
//! handshake signature is still verified in every mode, so the session key really belongs to
//! whoever holds the presented certificate (which is what channel binding builds on).
//!
//! Roots: `sslrootcert` when set, else the webpki (Mozilla) roots. Postgres deployments very
//! often use a self-signed server certificate and give clients that very certificate as
//! `sslrootcert`; webpki refuses such a certificate as an end entity when it carries
//! `CA:TRUE` (openssl's default for `req -x509`), while OpenSSL/libpq accept it. So an
//! end-entity certificate that is byte-identical to one from `sslrootcert` is trusted
//! directly (pinned), and only its host name is checked in `verify-full`.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::config::SslMode;
use crate::error::ReplicationError;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls client config for `mode` (not `Disable`).
pub fn client_config(
    mode: SslMode,
    sslrootcert: Option<&Path>,
) -> Result<rustls::ClientConfig, ReplicationError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ReplicationError::Tls(format!("tls setup: {e}")))?;

    let verify = match (mode, sslrootcert) {
        (SslMode::VerifyFull, _) => Some(true),
        (SslMode::VerifyCa, _) | (SslMode::Require, Some(_)) => Some(false),
        _ => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        None => Arc::new(AcceptAnyCert { provider }),
        Some(check_name) => {
            let mut roots = RootCertStore::empty();
            let mut pinned = Vec::new();
            match sslrootcert {
                Some(path) => {
                    for cert in read_pem_certs(path)? {
                        roots.add(cert.clone()).map_err(|e| {
                            ReplicationError::Tls(format!(
                                "sslrootcert {}: unusable certificate: {e}",
                                path.display()
                            ))
                        })?;
                        pinned.push(cert);
                    }
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ReplicationError::Tls(format!("tls roots: {e}")))?;
            Arc::new(VerifyChain {
                inner,
                pinned,
                check_name,
            })
        }
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ReplicationError> {
    let bad = |e: &dyn std::fmt::Display| {
        ReplicationError::Tls(format!("cannot read sslrootcert {}: {e}", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no certificates in file"));
    }
    Ok(certs)
}

/// The server name rustls checks against (an IP literal is checked as an IP SAN).
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, ReplicationError> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| ReplicationError::Tls(format!("'{host}' is not a valid tls server name: {e}")))
}

/// `prefer` / `require`: no certificate check (see the module docs for why).
#[derive(Debug)]
struct AcceptAnyCert {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `verify-ca` / `verify-full`.
#[derive(Debug)]
struct VerifyChain {
    inner: Arc<WebPkiServerVerifier>,
    /// Certificates from `sslrootcert`, trusted as end entities too.
    pinned: Vec<CertificateDer<'static>>,
    check_name: bool,
}

impl ServerCertVerifier for VerifyChain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self
            .pinned
            .iter()
            .any(|p| p.as_ref() == end_entity.as_ref())
        {
            if self.check_name {
                let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&parsed, server_name)?;
            }
            return Ok(ServerCertVerified::assertion());
        }
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// RFC 5929 `tls-server-end-point`: the certificate hashed with the hash of its signature
/// algorithm, SHA-256 for MD5/SHA-1/SHA-256 and anything we do not recognise (Postgres does
/// the same through OpenSSL's `X509_get_signature_info`).
pub(crate) fn tls_server_end_point(cert_der: &[u8]) -> Vec<u8> {
    const SHA384_OIDS: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],       // ecdsa-with-SHA384
    ];
    const SHA512_OIDS: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],       // ecdsa-with-SHA512
    ];
    match signature_algorithm_oid(cert_der) {
        Some(oid) if SHA384_OIDS.contains(&oid) => Sha384::digest(cert_der).to_vec(),
        Some(oid) if SHA512_OIDS.contains(&oid) => Sha512::digest(cert_der).to_vec(),
        _ => Sha256::digest(cert_der).to_vec(),
    }
}

/// `Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm AlgorithmIdentifier, … }`,
/// `AlgorithmIdentifier ::= SEQUENCE { algorithm OBJECT IDENTIFIER, … }`.
fn signature_algorithm_oid(der: &[u8]) -> Option<&[u8]> {
    let (cert, _) = der_tlv(der, 0x30)?;
    let (_tbs, rest) = der_any(cert)?;
    let (alg, _) = der_tlv(rest, 0x30)?;
    let (oid, _) = der_tlv(alg, 0x06)?;
    Some(oid)
}

/// Splits one DER TLV with the expected tag off `input`: (contents, rest).
fn der_tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *input.first()? != tag {
        return None;
    }
    der_any(input)
}

fn der_any(input: &[u8]) -> Option<(&[u8], &[u8])> {
    let first_len = *input.get(1)?;
    let (len, header) = if first_len < 0x80 {
        (usize::from(first_len), 2)
    } else {
        let n = usize::from(first_len & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = input.get(2..2 + n)?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((input.get(header..end)?, input.get(end..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_point_hash_defaults_to_sha256_on_garbage() {
        assert_eq!(tls_server_end_point(b"not der").len(), 32);
        assert_eq!(tls_server_end_point(&[]).len(), 32);
        assert_eq!(tls_server_end_point(&[0x30, 0x84, 0xff]).len(), 32);
    }

    #[test]
    fn finds_signature_algorithm() {
        // SEQUENCE { SEQUENCE {} (tbs), SEQUENCE { OID ecdsa-with-SHA384 }, BIT STRING }
        let der = [
            0x30, 0x10, 0x30, 0x00, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04,
            0x03, 0x03, 0x03, 0x02, 0x00, 0x00,
        ];
        assert_eq!(
            signature_algorithm_oid(&der),
            Some(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03][..])
        );
        assert_eq!(tls_server_end_point(&der).len(), 48);
    }
}
