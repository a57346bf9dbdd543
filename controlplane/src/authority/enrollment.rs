//! One-time enrollment tokens: how a client without a certificate gets its
//! first one (`stoq/1` kind `ENROLL`, see [`super::api`]).
//!
//! A token is minted by a process that is not the server
//! (`internet2-server enroll-token`) while the server runs and holds the
//! redb lock, so minting never opens the database: it needs only the
//! secret in `<data_dir>/enrollment.key` (32 random bytes, mode 0600, made
//! on first use by whichever process comes first, never rewritten).
//!
//! ```text
//! token = base64url_nopad( version (1) ‖ id (16 random bytes)
//!                          ‖ expiry (u64 BE, Unix seconds)
//!                          ‖ HMAC-SHA256(secret, the 25 bytes before)[..16] )
//! ```
//!
//! The server checks the MAC (in constant time) and the expiry here
//! ([`EnrollmentKey::verify`], which alone makes a [`VerifiedToken`]), and
//! spends the id in the authority's database in the same transaction as
//! the certificate it pays for (`logged::SpentToken`, written by the state
//! machine with the certificate's log entry), so a token is
//! good for exactly one certificate, across restarts.

use super::ca::{CaError, store};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The secret's file in the data directory.
pub const KEY_FILE: &str = "enrollment.key";
/// The token format this code mints and accepts.
pub const TOKEN_VERSION: u8 = 1;
/// The first byte of a cluster join token: the same format, for another
/// purpose (under the MAC, so one kind never passes for the other).
pub const JOIN_TOKEN_VERSION: u8 = 2;

/// What a token is good for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A client's first certificate (`ENROLL`).
    Enroll,
    /// A new member of the cluster (`CLUSTER_JOIN`).
    Join,
}

impl Purpose {
    fn version(self) -> u8 {
        match self {
            Purpose::Enroll => TOKEN_VERSION,
            Purpose::Join => JOIN_TOKEN_VERSION,
        }
    }
}
/// How long a token is good for unless the minter says otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// The longest lifetime a token may be minted with.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

const SECRET_LEN: usize = 32;
const ID_LEN: usize = 16;
const MAC_LEN: usize = 16;
const BODY_LEN: usize = 1 + ID_LEN + 8;
const TOKEN_LEN: usize = BODY_LEN + MAC_LEN;
/// The length of a token's text: base64 without padding of [`TOKEN_LEN`] bytes.
pub const TOKEN_TEXT_LEN: usize = (TOKEN_LEN * 4).div_ceil(3);
const _: () = assert!(TOKEN_TEXT_LEN == 55);

/// A token's id: what the server records as spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TokenId(pub [u8; ID_LEN]);

/// A token whose MAC and expiry were checked. Only
/// [`EnrollmentKey::verify`] makes one, and `logged::SpentToken::of` takes
/// one: no certificate is paid for with an unchecked token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedToken {
    id: TokenId,
    expires_at_s: u64,
}

impl VerifiedToken {
    pub fn id(&self) -> TokenId {
        self.id
    }

    /// Unix seconds.
    pub fn expires_at_s(&self) -> u64 {
        self.expires_at_s
    }
}

/// Why the secret cannot be loaded or a token minted.
#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] CaError),
    #[error(
        "{path}: the enrollment secret must be exactly {SECRET_LEN} bytes, found {len}; \
         restore it from a backup, or remove it to make a new one (unused tokens then stop working)"
    )]
    BadKeyFile { path: PathBuf, len: usize },
    #[error("the system random number generator failed")]
    Random,
    #[error("a token lifetime of {ttl:?} is not allowed; give 1 s to {max:?}", max = MAX_TTL)]
    BadTtl { ttl: Duration },
    #[error("the clock reads before 1970")]
    Clock,
}

/// Why a token is refused (all of them: `TOKEN_INVALID`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the enrollment token is not {TOKEN_TEXT_LEN} base64url characters")]
    Malformed,
    #[error("enrollment token version {0} is not supported; mint a new token")]
    Version(u8),
    #[error("the enrollment token was not minted by this server (bad MAC)")]
    BadMac,
    #[error("the enrollment token expired at {expired_at_s} (Unix seconds); mint a new one")]
    Expired { expired_at_s: u64 },
}

/// The enrollment secret, loaded.
pub struct EnrollmentKey {
    key: hmac::Key,
    /// A per-process key for the constant-time MAC comparison; see `verify`.
    blind: hmac::Key,
    rng: SystemRandom,
}

impl std::fmt::Debug for EnrollmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnrollmentKey(..)")
    }
}

impl EnrollmentKey {
    /// Load `<data_dir>/enrollment.key`, making it (and `data_dir`) when
    /// missing. Safe against another process making it at the same time:
    /// the file is linked into place only if absent, and whoever loses the
    /// race reads the winner's.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, EnrollmentError> {
        let path = data_dir.join(KEY_FILE);
        let rng = SystemRandom::new();
        if !path.exists() {
            create(data_dir, &path, &rng)?;
        }
        let secret = std::fs::read(&path).map_err(|source| EnrollmentError::Io {
            path: path.clone(),
            source,
        })?;
        if secret.len() != SECRET_LEN {
            return Err(EnrollmentError::BadKeyFile {
                path,
                len: secret.len(),
            });
        }
        let blind =
            hmac::Key::generate(hmac::HMAC_SHA256, &rng).map_err(|_| EnrollmentError::Random)?;
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            blind,
            rng,
        })
    }

    /// A new enrollment token valid for `ttl` from `now`.
    pub fn mint(&self, ttl: Duration, now: SystemTime) -> Result<String, EnrollmentError> {
        self.mint_for(Purpose::Enroll, ttl, now)
    }

    /// A new token for `purpose`, valid for `ttl` from `now`.
    pub fn mint_for(
        &self,
        purpose: Purpose,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, EnrollmentError> {
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(EnrollmentError::BadTtl { ttl });
        }
        let now_s = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| EnrollmentError::Clock)?
            .as_secs();
        let mut token = [0u8; TOKEN_LEN];
        token[0] = purpose.version();
        self.rng
            .fill(&mut token[1..1 + ID_LEN])
            .map_err(|_| EnrollmentError::Random)?;
        token[1 + ID_LEN..BODY_LEN].copy_from_slice(&(now_s + ttl.as_secs()).to_be_bytes());
        let tag = hmac::sign(&self.key, &token[..BODY_LEN]);
        token[BODY_LEN..].copy_from_slice(&tag.as_ref()[..MAC_LEN]);
        Ok(URL_SAFE_NO_PAD.encode(token))
    }

    /// Check a token's form, MAC and expiry (not whether it was spent:
    /// that is the database's, see `Authority::token_spent`).
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<VerifiedToken, TokenError> {
        self.verify_for(Purpose::Enroll, token, now)
    }

    /// [`Self::verify`] for a token of `purpose`.
    pub fn verify_for(
        &self,
        purpose: Purpose,
        token: &str,
        now: SystemTime,
    ) -> Result<VerifiedToken, TokenError> {
        let token = token.trim();
        if token.len() != TOKEN_TEXT_LEN {
            return Err(TokenError::Malformed);
        }
        let bytes: [u8; TOKEN_LEN] = URL_SAFE_NO_PAD
            .decode(token)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(TokenError::Malformed)?;
        if bytes[0] != purpose.version() {
            return Err(TokenError::Version(bytes[0]));
        }
        // The MAC is truncated, so `hmac::verify` cannot compare it with
        // the computed tag directly. Comparing HMACs of both under a
        // per-process random key is constant-time in what matters: an
        // attacker learns nothing about the expected tag from timing.
        let expected = hmac::sign(&self.key, &bytes[..BODY_LEN]);
        let blinded = hmac::sign(&self.blind, &expected.as_ref()[..MAC_LEN]);
        hmac::verify(&self.blind, &bytes[BODY_LEN..], blinded.as_ref())
            .map_err(|_| TokenError::BadMac)?;
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&bytes[1..1 + ID_LEN]);
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&bytes[1 + ID_LEN..BODY_LEN]);
        let expires_at_s = u64::from_be_bytes(expiry);
        let now_s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if now_s >= expires_at_s {
            return Err(TokenError::Expired {
                expired_at_s: expires_at_s,
            });
        }
        Ok(VerifiedToken {
            id: TokenId(id),
            expires_at_s,
        })
    }
}

/// Mint one token with the secret in `data_dir` (made if missing), valid
/// for `ttl` from `now`. Does not open the authority's database.
pub fn mint(data_dir: &Path, ttl: Duration, now: SystemTime) -> Result<String, EnrollmentError> {
    EnrollmentKey::load_or_create(data_dir)?.mint(ttl, now)
}

/// Write a fresh secret to a private staging name, then hard-link it to
/// `path`, which fails if another process got there first (then theirs is
/// kept: the file is never rewritten).
fn create(data_dir: &Path, path: &Path, rng: &SystemRandom) -> Result<(), EnrollmentError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| EnrollmentError::Io { path, source }
    };
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let mut secret = [0u8; SECRET_LEN];
    rng.fill(&mut secret).map_err(|_| EnrollmentError::Random)?;
    let mut nonce = [0u8; 8];
    rng.fill(&mut nonce).map_err(|_| EnrollmentError::Random)?;
    let staging = data_dir.join(format!(
        "{KEY_FILE}.{}.{:016x}",
        std::process::id(),
        u64::from_le_bytes(nonce)
    ));
    store::write_private(&staging, &secret)?;
    let linked = std::fs::hard_link(&staging, path);
    let _ = std::fs::remove_file(&staging);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(path)(e)),
    }
    store::sync_dir(data_dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("i2-enroll-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn tokens_verify_until_they_expire_and_the_key_is_never_rewritten() {
        let dir = temp_dir("basic");
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let token = mint(&dir, DEFAULT_TTL, now).unwrap();
        assert_eq!(token.len(), TOKEN_TEXT_LEN);
        let path = dir.join(KEY_FILE);
        let secret = std::fs::read(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second process (here: a second load) uses the same secret.
        let key = EnrollmentKey::load_or_create(&dir).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), secret);
        let verified = key.verify(&token, now).unwrap();
        assert_eq!(verified.expires_at_s(), 1_800_000_000 + 3600);
        assert_eq!(
            key.verify(&token, now + DEFAULT_TTL),
            Err(TokenError::Expired {
                expired_at_s: 1_800_003_600
            })
        );
        // Two tokens have different ids.
        let other = key
            .verify(&key.mint(DEFAULT_TTL, now).unwrap(), now)
            .unwrap();
        assert_ne!(other.id(), verified.id());
        // Every flipped bit of the MAC, the id or the expiry is refused.
        let raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        for bit in 8..TOKEN_LEN * 8 {
            let mut t = raw.clone();
            t[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(
                key.verify(&URL_SAFE_NO_PAD.encode(&t), now),
                Err(TokenError::BadMac),
                "bit {bit}"
            );
        }
        let mut t = raw.clone();
        t[0] = 2;
        assert_eq!(
            key.verify(&URL_SAFE_NO_PAD.encode(&t), now),
            Err(TokenError::Version(2))
        );
        assert_eq!(key.verify(&token[..54], now), Err(TokenError::Malformed));
        assert_eq!(key.verify("", now), Err(TokenError::Malformed));
        let bad_char = format!("{}*", &token[..54]);
        assert_eq!(key.verify(&bad_char, now), Err(TokenError::Malformed));
        // A token of another secret is refused.
        let elsewhere = temp_dir("elsewhere");
        let foreign = mint(&elsewhere, DEFAULT_TTL, now).unwrap();
        assert_eq!(key.verify(&foreign, now), Err(TokenError::BadMac));
        assert!(matches!(
            key.mint(Duration::ZERO, now),
            Err(EnrollmentError::BadTtl { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&elsewhere).unwrap();
    }

    #[test]
    fn a_short_key_file_is_refused_not_replaced() {
        let dir = temp_dir("short");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(KEY_FILE), b"short").unwrap();
        let err = EnrollmentKey::load_or_create(&dir).unwrap_err();
        assert!(err.to_string().contains(KEY_FILE), "{err}");
        assert_eq!(std::fs::read(dir.join(KEY_FILE)).unwrap(), b"short");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
