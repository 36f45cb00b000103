//! The endpoint's TLS (`--secure-serving`): the certificate and key given
//! (`--tls-cert`, `--tls-key`: PEM files, as a `kubernetes.io/tls` Secret
//! mounts them), or a certificate made at start, self-signed, for the names
//! the observer is reached by. Prometheus scrapes a self-signed endpoint
//! with `insecure_skip_verify`, as it scrapes kubelets; the bearer token is
//! what keeps strangers out (see [`super::auth`]).

use std::{path::Path, sync::Arc};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-cert {path}: {source}")]
    Cert {
        path: std::path::PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("--tls-key {path}: {source}")]
    Key {
        path: std::path::PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("cannot make a self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A TLS acceptor with the certificate in `files` (certificate, key), or a
/// self-signed one for `names`.
pub fn acceptor(files: Option<(&Path, &Path)>, names: &[String]) -> Result<TlsAcceptor, TlsError> {
    let (chain, key) = match files {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|source| TlsError::Cert {
                    path: cert.into(),
                    source,
                })?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
                path: key.into(),
                source,
            })?;
            (chain, key)
        }
        None => {
            let made = rcgen::generate_simple_self_signed(names.to_vec())?;
            let key = PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
            (vec![made.cert.der().clone()], key)
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_come_from_files_or_are_made() {
        assert!(acceptor(None, &["observer".into(), "10.0.0.1".into()]).is_ok());
        let dir = std::env::temp_dir().join(format!("observer-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["observer".into()]).unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        assert!(acceptor(Some((&cert, &key)), &[]).is_ok());
        std::fs::write(&key, "not a key").unwrap();
        let err = acceptor(Some((&cert, &key)), &[])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--tls-key"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
