//! What the harness's server and client are built from: a test PKI, the
//! DNS zone, an admission gate with one good bundle, client configs.

use super::{DNS_ADDRESS, DNS_NAME, GOOD_BUNDLE, SERVER_NAME};
use crate::admission::{
    AdmissionEvent, AdmissionGate, Admitted, CLOSE_ADMISSION_MALFORMED, PendingAdmission, Refusal,
};
use crate::protocols::Alpn;
use crate::protocols::doq::{PublishedName, Zone};
use crate::transport::{ClientIdentity, ServerTrust, TransportSettings, client_crypto};
use bytes::Bytes;
use quinn_proto::ClientConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

fn alpn_bytes(alpn: Alpn) -> &'static [u8] {
    match alpn {
        Alpn::Stoq => crate::protocols::ALPN_STOQ,
        Alpn::Doq => crate::protocols::ALPN_DOQ,
        Alpn::Perf => crate::protocols::ALPN_PERF,
    }
}

/// A client config for `alpn` with a fresh session cache, trusting the
/// harness CA, with its client certificate when `with_cert`. Its windows
/// are small, so what the server can push at a client that stops reading
/// stays small too.
pub(super) fn client_config(alpn: Alpn, with_cert: bool) -> ClientConfig {
    let pki = Pki::get();
    let identity = with_cert.then(|| pki.client.clone());
    let crypto = client_crypto(
        &ServerTrust::Roots(vec![pki.ca.clone()]),
        identity.as_ref(),
        alpn_bytes(alpn),
        true,
    )
    .expect("the harness client TLS config builds");
    let mut config = ClientConfig::new(crypto);
    let transport = TransportSettings {
        stream_receive_window_bytes: 64 * 1024,
        receive_window_bytes: 256 * 1024,
        ..TransportSettings::default()
    };
    config.transport_config(Arc::new(transport.build()));
    config
}

/// The zone the harness's server answers `doq` from.
pub(super) fn zone() -> Zone {
    Zone::from_records(
        "internet2.test",
        "node1",
        1,
        &[PublishedName {
            name: DNS_NAME.into(),
            aaaa: vec![DNS_ADDRESS],
            tlsa: vec![(4433, [7; 32])],
        }],
    )
    .expect("the harness zone is valid")
}

/// The harness's admission: every certificate gets parameters; only
/// [`GOOD_BUNDLE`] verifies.
#[derive(Debug)]
pub(super) struct HarnessGate;

struct HarnessPending;

impl AdmissionGate for HarnessGate {
    fn required(&self) -> bool {
        true
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs(5)
    }

    fn offer(&self, _leaf: &CertificateDer<'static>) -> Result<Box<dyn PendingAdmission>, Refusal> {
        Ok(Box::new(HarnessPending))
    }

    fn report(&self, _event: AdmissionEvent) {}

    fn status(&self) -> serde_json::Value {
        serde_json::json!({ "mode": "harness" })
    }
}

impl PendingAdmission for HarnessPending {
    fn parameters(&self) -> Bytes {
        Bytes::from_static(b"harness parameters")
    }

    fn identity(&self) -> [u8; 32] {
        [7; 32]
    }

    fn verify(&self, _binding: &[u8; 32], bundle: &[u8]) -> Result<Admitted, Refusal> {
        if bundle == GOOD_BUNDLE {
            Ok(Admitted {
                identity: self.identity(),
                reply: Bytes::from_static(b"admitted"),
            })
        } else {
            Err(Refusal {
                code: CLOSE_ADMISSION_MALFORMED,
                reason: "the harness gate takes its one bundle only".into(),
            })
        }
    }
}

/// A test CA, the server's certificate and a client certificate, made
/// once per process.
pub(super) struct Pki {
    pub(super) ca: CertificateDer<'static>,
    pub(super) server: CertificateDer<'static>,
    server_key: Vec<u8>,
    pub(super) client: ClientIdentity,
}

impl Pki {
    pub(super) fn get() -> &'static Pki {
        static PKI: OnceLock<Pki> = OnceLock::new();
        PKI.get_or_init(Pki::generate)
    }

    pub(super) fn server_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()))
    }

    fn generate() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        let ca_key = KeyPair::generate().expect("key generation");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("no names");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "internet2 harness CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA self-signs");
        let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("key generation");
            let mut params =
                CertificateParams::new(vec![name.to_owned()]).expect("a valid DNS name");
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &ca, &ca_key).expect("CA signs");
            (cert.der().clone(), key.serialize_der())
        };
        let (server, server_key) = leaf(SERVER_NAME, ExtendedKeyUsagePurpose::ServerAuth);
        let (client, client_key) =
            leaf("client.internet2.test", ExtendedKeyUsagePurpose::ClientAuth);
        Pki {
            ca: ca.der().clone(),
            server,
            server_key,
            client: ClientIdentity {
                chain: vec![client],
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(client_key)),
            },
        }
    }
}
