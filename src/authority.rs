//! The authority, the binary's side: the control-plane runtime is
//! `controlplane::runtime` (re-exported here); what is here is for the
//! local operator's commands: a rotation request, an operator request, the
//! operator's target and identity files.

pub use controlplane::runtime::{
    AdmissionPlug, AuthorityRuntime, AuthorityStartError, CA_FILE, NODE_KEY_FILE, OPERATOR_FILE,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::time::Duration;

/// The running server's answer to `internet2-server rotate`.
pub use controlplane::authority::api::Rotated;

/// Ask the server listening on `listen` (its data directory `data_dir`
/// holds the root and the operator identity) to rotate its certificate.
pub fn request_rotation(
    data_dir: &Path,
    listen: std::net::SocketAddrV6,
    server_names: &[String],
    timeout: Duration,
) -> anyhow::Result<Rotated> {
    use anyhow::Context;
    let body = operator_request(
        data_dir,
        listen,
        server_names,
        controlplane::authority::api::ROTATE,
        b"{}",
        timeout,
    )?;
    serde_json::from_slice(&body).context("the server's answer is not JSON")
}

/// Send one request to the local server as its operator; the answer's
/// payload, or the server's refusal as an error.
pub fn operator_request(
    data_dir: &Path,
    listen: std::net::SocketAddrV6,
    server_names: &[String],
    kind: u8,
    payload: &[u8],
    timeout: Duration,
) -> anyhow::Result<bytes::Bytes> {
    use dataplane::client::rpc::Reply;
    let target = local_operator_target(data_dir, listen, server_names)?;
    let config = target.client_config(dataplane::protocols::ALPN_STOQ)?;
    let outcome = dataplane::client::rpc_raw(&target, &config, kind, payload, timeout)?;
    match &outcome.replies[0] {
        Reply::Ok(body) => Ok(body.clone()),
        Reply::Error { code, message } => {
            anyhow::bail!("the server refused ({code:#x}): {message}")
        }
        Reply::Failed(why) => anyhow::bail!(
            "cannot reach the server on [{}]:{}: {why}",
            listen.ip(),
            listen.port()
        ),
    }
}

/// A client target for the local server as its operator: the root and the
/// operator identity from the data directory.
pub fn local_operator_target(
    data_dir: &Path,
    listen: std::net::SocketAddrV6,
    server_names: &[String],
) -> anyhow::Result<dataplane::client::ClientTarget> {
    use anyhow::Context;
    use rustls::pki_types::pem::PemObject;
    let ca_path = data_dir.join(CA_FILE);
    let root = CertificateDer::from_pem_file(&ca_path).with_context(|| {
        format!(
            "cannot read {} (is the server's data directory right?)",
            ca_path.display()
        )
    })?;
    let operator_path = data_dir.join(OPERATOR_FILE);
    let identity = load_identity(&operator_path)?;
    let admitter = crate::admission::admitter_for_file(&identity, &operator_path)?;
    let ip = if listen.ip().is_unspecified() {
        std::net::Ipv6Addr::LOCALHOST
    } else {
        *listen.ip()
    };
    let server_name =
        if listen.ip().is_unspecified() || server_names.contains(&"localhost".to_string()) {
            server_names
                .first()
                .cloned()
                .unwrap_or_else(|| "localhost".into())
        } else {
            ip.to_string()
        };
    Ok(dataplane::client::ClientTarget {
        remote: std::net::SocketAddr::V6(std::net::SocketAddrV6::new(ip, listen.port(), 0, 0)),
        server_name,
        trust: dataplane::ServerTrust::Roots(vec![root]),
        identity: Some(identity),
        backend: dataplane::BackendKind::Socket,
        transport: dataplane::TransportSettings::default(),
        admitter: Some(admitter),
    })
}

/// A client identity file: the certificate chain and the private key, PEM,
/// in one file (`operator.pem`, or what `internet2 enroll` saved).
pub fn load_identity(path: &Path) -> anyhow::Result<dataplane::ClientIdentity> {
    use rustls::pki_types::pem::PemObject;
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("{}: not a PEM identity file: {e}", path.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{}: holds no certificate", path.display());
    }
    let key = PrivateKeyDer::from_pem_file(path)
        .map_err(|e| anyhow::anyhow!("{}: holds no private key: {e}", path.display()))?;
    Ok(dataplane::ClientIdentity { chain, key })
}
