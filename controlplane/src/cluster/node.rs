//! A member's identity and how a new one joins.
//!
//! A member is named in its data directory by `cluster-node.json` (its
//! Raft id, name and `[address]:port`) and authenticated to the others by
//! its node certificate (`cluster-node.pem`: subject CN
//! `cluster-node.NAME`, the member's address, client usage, on the
//! server's own key `server-tls.key`). Its Raft id is derived from that
//! key, so a node restarted with a wiped data directory has a new key and
//! joins as a new member: it can never take an old member's place in the
//! log.
//!
//! Joining: an operator prints a join token on any member
//! (`internet2-server cluster join-token`): a one-time token of the
//! enrollment secret, for the purpose `Join` (an enrollment token is not
//! one), followed by the SHA-256 pin of the cluster's intermediate CA key.
//! The new node connects to the member it is given without a certificate,
//! trusting only a chain through that pinned issuer, and sends
//! `CLUSTER_JOIN` with the token, its name, its address and its public key.
//! The leader spends the token in the log with the node certificate it
//! issues, adds the node as a learner, and answers with the certificate and
//! the keys every member holds ([`super::SHARED_KEY_FILES`], the CA, the
//! operator identity); it promotes the learner to voter once it caught up.

use super::SHARED_KEY_FILES;
use crate::authority::ca::store::write_private;
use crate::authority::enrollment::{EnrollmentKey, Purpose};
use crate::authority::logged::CA_DIR;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// The member's id, name and address.
pub const NODE_FILE: &str = "cluster-node.json";
/// The member's node certificate and the intermediate (PEM).
pub const NODE_CERT_FILE: &str = "cluster-node.pem";
/// The operator identity every member holds a copy of.
pub const OPERATOR_FILE: &str = crate::runtime::OPERATOR_FILE;
/// The longest member name (one DNS label).
pub const NAME_MAX: usize = 63;

/// Who this member is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: u64,
    pub name: String,
    pub address: String,
}

/// The subject CN of member `name`'s node certificate.
pub fn node_subject(name: &str) -> String {
    format!("{}{name}", dataplane::trust::NODE_COMMON_NAME_PREFIX)
}

/// A member's Raft id: the first 8 bytes of SHA-256 of its public key
/// (SubjectPublicKeyInfo DER), never 0.
pub fn node_id(spki: &[u8]) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, spki);
    let mut pin = [0u8; 32];
    pin.copy_from_slice(digest.as_ref());
    node_id_of_pin(&pin)
}

/// The member id of the key whose TLSA `3 1 1` pin (SHA-256 of the
/// SubjectPublicKeyInfo) is `pin`: what ties a published pin to a member.
pub fn node_id_of_pin(pin: &[u8; 32]) -> u64 {
    let mut id = [0u8; 8];
    id.copy_from_slice(&pin[..8]);
    u64::from_be_bytes(id).max(1)
}

/// A member name: one DNS label of lower-case letters, digits and `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a member name: 1 to {NAME_MAX} lower-case letters, digits and '-', not at either end"
        ))
    }
}

/// A member address: `[IPv6]:port`, neither unspecified nor v4-mapped.
pub fn check_address(address: &str) -> Result<SocketAddr, String> {
    match address.parse::<SocketAddr>() {
        Ok(SocketAddr::V6(a))
            if !a.ip().is_unspecified() && a.ip().to_ipv4_mapped().is_none() && a.port() != 0 =>
        {
            Ok(SocketAddr::V6(a))
        }
        _ => Err(format!(
            "{address:?} is not a member address: [IPv6 address]:port, the address other members reach this one at"
        )),
    }
}

/// This member's record, if the data directory holds one.
pub fn load_node(data_dir: &Path) -> Result<Option<NodeRecord>, String> {
    let path = data_dir.join(NODE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

pub fn save_node(data_dir: &Path, node: &NodeRecord) -> Result<(), String> {
    let path = data_dir.join(NODE_FILE);
    let bytes = serde_json::to_vec_pretty(node).expect("JSON");
    write_private(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Write the node certificate (leaf DER) with the intermediate.
pub fn save_node_certificate(
    data_dir: &Path,
    leaf_der: &[u8],
    intermediate_der: &[u8],
) -> Result<(), String> {
    let pem = crate::authority::service::pem_certificate;
    let path = data_dir.join(NODE_CERT_FILE);
    let text = format!("{}{}", pem(leaf_der), pem(intermediate_der));
    write_private(&path, text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

/// The node certificate chain and the key it certifies: how this member
/// authenticates to the others. `None` before it has one.
pub fn node_identity(data_dir: &Path) -> Result<Option<dataplane::ClientIdentity>, String> {
    use rustls::pki_types::pem::PemObject;
    let cert_path = data_dir.join(NODE_CERT_FILE);
    if !cert_path.exists() {
        return Ok(None);
    }
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(&cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let key = crate::authority::service::load_or_create_server_key(data_dir)
        .map_err(|e| e.to_string())?;
    Ok(Some(dataplane::ClientIdentity {
        chain,
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
    }))
}

/// A join token: a one-time token of the enrollment secret for the
/// purpose `Join`, then `.` and the pin of the cluster's intermediate CA
/// key (base64url SHA-256 of its SubjectPublicKeyInfo).
pub fn mint_join_token(data_dir: &Path, ttl: Duration, now: SystemTime) -> Result<String, String> {
    let intermediate = data_dir
        .join(CA_DIR)
        .join(crate::authority::ca::INTERMEDIATE_CERT_FILE);
    let der = crate::authority::pem::load_cert(&intermediate).map_err(|e| {
        format!(
            "{}: {e} (is this a member's data directory?)",
            intermediate.display()
        )
    })?;
    let pin = crate::authority::pem::spki_sha256(&der).map_err(|e| e.to_string())?;
    let token = EnrollmentKey::load_or_create(data_dir)
        .and_then(|key| key.mint_for(Purpose::Join, ttl, now))
        .map_err(|e| e.to_string())?;
    Ok(format!("{token}.{}", URL_SAFE_NO_PAD.encode(pin)))
}

/// A join token's one-time token and issuer pin.
pub fn parse_join_token(text: &str) -> Result<(String, [u8; 32]), String> {
    let (token, pin) = text
        .trim()
        .split_once('.')
        .ok_or("a join token is TOKEN.PIN, as `cluster join-token` prints it")?;
    let pin: [u8; 32] = URL_SAFE_NO_PAD
        .decode(pin)
        .ok()
        .and_then(|pin| pin.try_into().ok())
        .ok_or("the join token's pin is not 32 bytes of base64url")?;
    Ok((token.to_owned(), pin))
}

/// `CLUSTER_JOIN`'s request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The one-time token (without the pin).
    pub token: String,
    pub name: String,
    pub address: String,
    /// The names it serves as (DNS names and IP addresses), which its
    /// certificate carries beside its address.
    pub server_names: Vec<String>,
    /// The new member's public key, SubjectPublicKeyInfo DER, base64.
    pub public_key: String,
    /// The /64 locator of the memory assets it will hold, if it serves
    /// them: no other member's.
    #[serde(default)]
    pub locator: Option<u64>,
}

/// `CLUSTER_JOIN`'s answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinAnswer {
    pub id: u64,
    /// The node certificate, DER, base64.
    pub node_certificate: String,
    /// The files every member holds, by path in the data directory, base64.
    pub files: BTreeMap<String, String>,
}

/// The files a joining member receives, read from this member's data
/// directory: the CA's directory, [`SHARED_KEY_FILES`], the operator
/// identity.
pub fn shared_files(data_dir: &Path) -> Result<BTreeMap<String, String>, String> {
    let mut files = BTreeMap::new();
    let read = |relative: String, files: &mut BTreeMap<String, String>| {
        let path = data_dir.join(&relative);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        files.insert(relative, STANDARD.encode(bytes));
        Ok::<(), String>(())
    };
    let ca = data_dir.join(CA_DIR);
    let entries = std::fs::read_dir(&ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", ca.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        read(format!("{CA_DIR}/{name}"), &mut files)?;
    }
    for file in SHARED_KEY_FILES.iter().chain([&OPERATOR_FILE]) {
        if data_dir.join(file).exists() {
            read((*file).to_owned(), &mut files)?;
        }
    }
    Ok(files)
}

/// Write what [`shared_files`] read into a new member's data directory
/// (private files). Only names of that form are written.
fn write_shared_files(data_dir: &Path, files: &BTreeMap<String, String>) -> Result<(), String> {
    for (relative, body) in files {
        let allowed = match relative.split_once('/') {
            Some((CA_DIR, name)) => {
                !name.is_empty() && !name.contains('/') && !name.starts_with('.')
            }
            Some(_) => false,
            None => SHARED_KEY_FILES.contains(&relative.as_str()) || relative == OPERATOR_FILE,
        };
        if !allowed {
            return Err(format!(
                "the member sent a file this node does not take: {relative:?}"
            ));
        }
        let bytes = STANDARD
            .decode(body)
            .map_err(|_| format!("the member sent {relative:?} in malformed base64"))?;
        let path = data_dir.join(relative);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        write_private(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// How a joining node reaches the member it joins through.
pub struct JoinVia {
    pub remote: SocketAddr,
    pub backend: dataplane::io::BackendKind,
    pub transport: dataplane::TransportSettings,
    pub timeout: Duration,
}

/// Join the cluster through the member at `via` with `token_text`, as
/// member `name` reachable at `address`, holding the memory assets of
/// `locator` if any: on success the data directory holds the cluster's
/// keys, this member's node certificate and record.
/// The data directory must not hold a CA already.
pub fn join(
    data_dir: &Path,
    via: &JoinVia,
    token_text: &str,
    name: &str,
    address: &str,
    server_names: &[String],
    locator: Option<u64>,
) -> Result<NodeRecord, String> {
    check_name(name)?;
    check_address(address)?;
    if data_dir.join(CA_DIR).exists() {
        return Err(format!(
            "{} already holds a CA: a node joins a cluster with a new, empty data directory",
            data_dir.display()
        ));
    }
    let (token, pin) = parse_join_token(token_text)?;
    std::fs::create_dir_all(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    let spki = crate::authority::service::server_public_key(data_dir).map_err(|e| e.to_string())?;
    let request = JoinRequest {
        token,
        name: name.to_owned(),
        address: address.to_owned(),
        server_names: server_names.to_vec(),
        public_key: STANDARD.encode(&spki),
        locator,
    };
    let payload = serde_json::to_vec(&request).expect("JSON");
    let mut remote = via.remote;
    // The member asked may not be the leader: it names the leader, asked
    // next (a few times at most, while an election settles).
    for _ in 0..5 {
        let target = dataplane::client::ClientTarget {
            remote,
            server_name: remote.ip().to_string(),
            trust: dataplane::ServerTrust::IssuerPin(pin),
            identity: None,
            backend: via.backend,
            transport: via.transport.clone(),
            admitter: None,
        };
        let config = target
            .client_config(dataplane::protocols::ALPN_STOQ)
            .map_err(|e| e.to_string())?;
        let outcome = dataplane::client::rpc_raw(
            &target,
            &config,
            dataplane::protocols::stoq_registry::CLUSTER_JOIN,
            &payload,
            via.timeout,
        )
        .map_err(|e| e.to_string())?;
        match outcome.replies.into_iter().next() {
            Some(dataplane::client::rpc::Reply::Ok(body)) => {
                let answer: JoinAnswer = serde_json::from_slice(&body)
                    .map_err(|e| format!("the member's join answer: {e}"))?;
                return finish_join(data_dir, answer, &spki, name, address);
            }
            Some(dataplane::client::rpc::Reply::Error { code, message })
                if code == crate::authority::api::NOT_LEADER =>
            {
                match leader_address(&message) {
                    Some(leader) => remote = leader,
                    None => std::thread::sleep(Duration::from_millis(500)),
                }
            }
            Some(dataplane::client::rpc::Reply::Error { code, message }) => {
                return Err(format!(
                    "the cluster refused to let this node join ({code:#x}): {message}"
                ));
            }
            Some(dataplane::client::rpc::Reply::Failed(why)) if why.contains("IssuerMismatch") => {
                return Err(format!(
                    "{remote} is not a member of the cluster this token is for: its certificate does not chain to the CA the token pins"
                ));
            }
            Some(dataplane::client::rpc::Reply::Failed(why)) => {
                return Err(format!("no answer from {remote}: {why}"));
            }
            None => return Err(format!("no answer from {remote}")),
        }
    }
    Err("no member answered as the leader; is the cluster electing one? try again".into())
}

/// The leader's address in a `NOT_LEADER` message (`… (ADDRESS) …`).
pub fn leader_address(message: &str) -> Option<SocketAddr> {
    let start = message.find("([")? + 1;
    let end = start + message[start..].find(')')?;
    message[start..end].parse().ok()
}

fn finish_join(
    data_dir: &Path,
    answer: JoinAnswer,
    spki: &[u8],
    name: &str,
    address: &str,
) -> Result<NodeRecord, String> {
    if answer.id != node_id(spki) {
        return Err(format!(
            "the cluster gave this node id {}, not the one its key makes; refusing",
            answer.id
        ));
    }
    write_shared_files(data_dir, &answer.files)?;
    let leaf = STANDARD
        .decode(&answer.node_certificate)
        .map_err(|_| "the node certificate is malformed base64".to_owned())?;
    let intermediate = crate::authority::pem::load_cert(
        &data_dir
            .join(CA_DIR)
            .join(crate::authority::ca::INTERMEDIATE_CERT_FILE),
    )
    .map_err(|e| format!("the cluster's intermediate: {e}"))?;
    save_node_certificate(data_dir, &leaf, &intermediate)?;
    let node = NodeRecord {
        id: answer.id,
        name: name.to_owned(),
        address: address.to_owned(),
    };
    save_node(data_dir, &node)?;
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::{node_id, node_id_of_pin};

    #[test]
    fn a_members_id_follows_from_its_keys_pin() {
        let key = rcgen::KeyPair::generate().unwrap();
        let spki = key.public_key_der();
        let digest = ring::digest::digest(&ring::digest::SHA256, &spki);
        let pin: [u8; 32] = digest.as_ref().try_into().unwrap();
        assert_eq!(node_id(&spki), node_id_of_pin(&pin));
        let mut other = pin;
        other[0] ^= 1;
        assert_ne!(node_id(&spki), node_id_of_pin(&other));
    }
}
