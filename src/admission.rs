//! Four-proof admission, the binary's side: the server's part (the gate
//! the workers call, the control plane's runtime) is
//! `controlplane::runtime::admission`, re-exported here; the client's is
//! [`KeyAdmitter`], which makes the four proofs with the client's key and
//! a cached plot, so `internet2` commands are admitted without the user
//! noticing.

pub use controlplane::runtime::admission::*;

use anyhow::Context;
use controlplane::authority::api::hex;
use controlplane::authority::ct::Hash;
use controlplane::consensus::binding::Binding;
use controlplane::consensus::space::{Plot, SpaceParams};
use controlplane::consensus::stake::{ClientKey, Identity};
use controlplane::consensus::wire::{self, PlotRegistration};
use controlplane::consensus::{AdmissionMode, prove_bundle};
use dataplane::admission::Admitter;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

// ------------------------------------------------------------ the client

enum Signer {
    Ecdsa(ring::signature::EcdsaKeyPair),
    Ed25519(ring::signature::Ed25519KeyPair),
}

/// Makes a client's proofs with its certificate key (see the module
/// documentation). Plots are kept in memory and, with a cache path, on
/// disk beside the identity file (`IDENTITY.plot-kK`, 0600).
pub struct KeyAdmitter {
    identity: Identity,
    signer: Signer,
    cache: Option<PathBuf>,
    plots: Mutex<HashMap<u8, Arc<Plot>>>,
    /// Print a progress line while a plot is built.
    progress: bool,
}

impl std::fmt::Debug for KeyAdmitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAdmitter")
            .field("identity", &hex(&self.identity.0))
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// Plot cache file header.
const PLOT_MAGIC: &[u8; 8] = b"i2plot1\n";

impl KeyAdmitter {
    /// For `identity` (its leaf certificate and PKCS#8 key); `cache` is
    /// the identity file the plot cache goes beside.
    pub fn new(
        identity: &dataplane::ClientIdentity,
        cache: Option<&Path>,
        progress: bool,
    ) -> anyhow::Result<Arc<Self>> {
        let leaf = identity
            .chain
            .first()
            .context("the identity holds no certificate")?;
        let key = ClientKey::from_certificate_der(leaf)
            .map_err(|e| anyhow::anyhow!("this identity cannot be admitted: {e}"))?;
        let rustls::pki_types::PrivateKeyDer::Pkcs8(pkcs8) = &identity.key else {
            anyhow::bail!("the identity's key is not PKCS#8; admission signs with PKCS#8 keys");
        };
        let der = pkcs8.secret_pkcs8_der();
        let signer = match key.algorithm() {
            controlplane::consensus::stake::KeyAlgorithm::EcdsaP256Sha256 => Signer::Ecdsa(
                ring::signature::EcdsaKeyPair::from_pkcs8(
                    &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                    der,
                    &ring::rand::SystemRandom::new(),
                )
                .map_err(|e| anyhow::anyhow!("the identity's ECDSA key: {e}"))?,
            ),
            controlplane::consensus::stake::KeyAlgorithm::Ed25519 => Signer::Ed25519(
                ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                    .map_err(|e| anyhow::anyhow!("the identity's Ed25519 key: {e}"))?,
            ),
        };
        Ok(Arc::new(Self {
            identity: key.identity(),
            signer,
            cache: cache.map(Path::to_owned),
            plots: Mutex::new(HashMap::new()),
            progress,
        }))
    }

    pub fn identity(&self) -> Identity {
        self.identity
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        match &self.signer {
            Signer::Ecdsa(key) => key
                .sign(&ring::rand::SystemRandom::new(), message)
                .map(|s| s.as_ref().to_vec())
                .unwrap_or_default(),
            Signer::Ed25519(key) => key.sign(message).as_ref().to_vec(),
        }
    }

    fn cache_path(&self, k: u8) -> Option<PathBuf> {
        self.cache.as_ref().map(|p| {
            let mut name = p.as_os_str().to_owned();
            name.push(format!(".plot-k{k}"));
            PathBuf::from(name)
        })
    }

    /// The plot for `params`: from memory, the cache file, or built now.
    pub fn plot(&self, params: SpaceParams) -> Arc<Plot> {
        let k = params.k();
        if let Some(plot) = self.plots.lock().expect("not poisoned").get(&k)
            && plot.params() == params
        {
            return plot.clone();
        }
        let cached = self
            .cache_path(k)
            .and_then(|path| load_plot(&path, &self.identity.0, params));
        let plot = Arc::new(match cached {
            Some(plot) => plot,
            None => {
                let plot = self.build_plot(params);
                if let Some(path) = self.cache_path(k)
                    && let Err(e) = save_plot(&path, &plot)
                {
                    tracing::warn!(path = %path.display(), error = %e, "could not cache the plot; it is rebuilt next time");
                }
                plot
            }
        });
        self.plots
            .lock()
            .expect("not poisoned")
            .insert(k, plot.clone());
        plot
    }

    fn build_plot(&self, params: SpaceParams) -> Plot {
        let started = Instant::now();
        let show = self.progress && params.leaves() >= 1 << 16;
        let plot = Plot::build(&self.identity.0, params, |done, total| {
            if show {
                eprint!(
                    "\rbuilding the admission plot: {done}/{total} leaves ({}%)",
                    done * 100 / total
                );
            }
        });
        if show {
            eprintln!(" done in {:.1} s", started.elapsed().as_secs_f64());
        }
        plot
    }
}

fn load_plot(path: &Path, identity: &Hash, params: SpaceParams) -> Option<Plot> {
    let bytes = std::fs::read(path).ok()?;
    let header = PLOT_MAGIC.len() + 1 + 32 + 32;
    let (head, body) = bytes.split_at_checked(header)?;
    if &head[..8] != PLOT_MAGIC || head[8] != params.k() || &head[9..41] != identity {
        return None;
    }
    if ring::digest::digest(&ring::digest::SHA256, body).as_ref() != &head[41..73] {
        tracing::warn!(path = %path.display(), "the plot cache is corrupt; rebuilding it");
        return None;
    }
    let leaves = body
        .chunks_exact(32)
        .map(|c| <[u8; 32]>::try_from(c).expect("32 bytes"))
        .collect();
    Plot::from_leaf_hashes(identity, params, leaves)
}

fn save_plot(path: &Path, plot: &Plot) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let body: Vec<u8> = plot.leaf_hashes().concat();
    let digest = ring::digest::digest(&ring::digest::SHA256, &body);
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(PLOT_MAGIC)?;
    file.write_all(&[plot.params().k()])?;
    file.write_all(plot.identity())?;
    file.write_all(digest.as_ref())?;
    file.write_all(&body)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Admitter for KeyAdmitter {
    fn registration(&self, parameters: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let offer = wire::decode_offer(parameters)
            .map_err(|e| format!("the server's admission parameters: {e}"))?;
        offer
            .verify_tick()
            .map_err(|e| format!("the server's beacon tick does not verify: {e}"))?;
        let mode = offer.params.mode;
        if mode.space {
            let plot = self.plot(offer.params.space);
            let ours = plot.commitment();
            if offer
                .registered_plot
                .is_none_or(|p| p.commitment != ours || p.k != offer.params.space.k())
            {
                return Ok(Some(
                    PlotRegistration {
                        k: offer.params.space.k(),
                        commitment: ours,
                    }
                    .encode(),
                ));
            }
        }
        if let Some(short) = StakeShortfall::of(&offer) {
            return Err(format!(
                "identity {} holds stake {} below this server's minimum {}; the operator grants it with `{}`",
                self.identity,
                short.held,
                short.min,
                short.grant_command(&self.identity)
            ));
        }
        Ok(None)
    }

    fn bundle(&self, parameters: &[u8], binding: &[u8; 32]) -> Result<Vec<u8>, String> {
        let offer = wire::decode_offer(parameters)
            .map_err(|e| format!("the server's admission parameters: {e}"))?;
        let plot = offer
            .params
            .mode
            .space
            .then(|| self.plot(offer.params.space));
        let bundle = prove_bundle(
            &offer.params,
            &Binding::from_exporter(*binding),
            |message| self.sign(message),
            plot.as_deref(),
        );
        bundle
            .encode()
            .map_err(|e| format!("cannot encode the bundle: {e}"))
    }
}

/// An admitter for the identity file at `path` (plot cached beside it).
pub fn admitter_for_file(
    identity: &dataplane::ClientIdentity,
    path: &Path,
) -> anyhow::Result<Arc<dyn Admitter>> {
    Ok(KeyAdmitter::new(identity, Some(path), true)?)
}

/// `mode` as it is written in the config.
pub fn mode_name(mode: AdmissionMode) -> String {
    if mode == AdmissionMode::MANDATORY {
        return "mandatory".into();
    }
    let names: Vec<&str> = [
        (mode.work, "work"),
        (mode.time, "time"),
        (mode.stake, "stake"),
        (mode.space, "space"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    if names.is_empty() {
        "off".into()
    } else {
        names.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_parse_from_hex_only() {
        let id = parse_identity(&"ab".repeat(32)).unwrap();
        assert_eq!(id.0, [0xab; 32]);
        assert!(parse_identity("ab").is_err());
        assert!(parse_identity(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn the_plot_cache_loads_only_what_it_saved() {
        let dir = std::env::temp_dir().join(format!("i2-plot-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("id.pem.plot-k6");
        let params = SpaceParams::new(6, 4).unwrap();
        let identity = [7u8; 32];
        let plot = Plot::build(&identity, params, |_, _| {});
        save_plot(&path, &plot).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = load_plot(&path, &identity, params).unwrap();
        assert_eq!(loaded.commitment(), plot.commitment());
        assert_eq!(loaded.leaf_hashes(), plot.leaf_hashes());
        // Another identity's or another size's cache is not used.
        assert!(load_plot(&path, &[8u8; 32], params).is_none());
        assert!(load_plot(&path, &identity, SpaceParams::new(7, 4).unwrap()).is_none());
        // Any flipped bit in the leaves is caught by the checksum; a short
        // file is refused.
        let bytes = std::fs::read(&path).unwrap();
        for at in [PLOT_MAGIC.len() + 1 + 32 + 32, bytes.len() - 1] {
            let mut corrupt = bytes.clone();
            corrupt[at] ^= 1;
            std::fs::write(&path, &corrupt).unwrap();
            assert!(
                load_plot(&path, &identity, params).is_none(),
                "flip at {at}"
            );
        }
        std::fs::write(&path, &bytes[..bytes.len() - 32]).unwrap();
        assert!(load_plot(&path, &identity, params).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mode_names_round_trip() {
        for text in ["mandatory", "work", "work,time", "stake,space", "off"] {
            let mode = if text == "off" {
                AdmissionMode::parse("").unwrap()
            } else {
                AdmissionMode::parse(text).unwrap()
            };
            assert_eq!(mode_name(mode), text);
        }
    }
}
