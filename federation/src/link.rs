//! Peering with one-time tokens (`isthmus link create` / `link apply`).
//!
//! `link create` in cluster A prints a token and records it in A's state
//! directory. The token carries A's federation address, cluster name,
//! trust domain, controller identity, the SHA-256 fingerprint of A's root,
//! a token id, a secret, and an expiry, followed by an HMAC-SHA256 of all
//! that under the secret.
//!
//! `link apply` in cluster B checks the token's MAC (tampered?) and expiry,
//! and records A as a pending peer. B's controller then calls A's `Link`
//! RPC over TLS, trusting A's server only if its chain ends at a root with
//! the token's fingerprint and names A's controller, and proves the secret
//! with an HMAC over the exact token and its own cluster name. A refuses
//! unknown, expired, reused and altered tokens, each with its own
//! message; otherwise both sides store each other's trust bundle and from
//! then on federate over mTLS like statically configured peers.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Prefix of every token (format version 1).
pub const TOKEN_PREFIX: &str = "isthmus1";
/// Default token lifetime.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// Why a token was refused. Each case says which, as operators need.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "not an Isthmus link token (it should start with {TOKEN_PREFIX}.); copy the whole line printed by `isthmus link create`"
    )]
    Format,
    #[error(
        "the token was tampered with or damaged: its signature does not match its contents; ask for a new one"
    )]
    Tampered,
    #[error("the token expired at {0}; create a new one with `isthmus link create`")]
    Expired(String),
    #[error(
        "the token was already used (by cluster {0:?}); tokens are single-use, create a new one"
    )]
    Reused(String),
    #[error(
        "unknown token {0:?}: it was not created by this cluster's controller (or its state directory was reset)"
    )]
    Unknown(String),
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenPayload {
    pub cluster: String,
    pub trust_domain: String,
    pub address: String,
    pub identity: String,
    pub root_fingerprint: String,
    pub token_id: String,
    pub secret: String,
    /// Seconds since the Unix epoch.
    pub expires: u64,
}

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &str, data: &[u8]) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

fn verify_mac(secret: &str, data: &[u8], tag: &[u8]) -> bool {
    let mut m = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    m.update(data);
    m.verify_slice(tag).is_ok()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn rfc3339(unix: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// A decoded, MAC-checked token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub payload: TokenPayload,
    /// The exact encoded token (what the proof covers).
    pub encoded: String,
}

impl Token {
    /// A new token with a random id and secret.
    pub fn create(
        cluster: &str,
        trust_domain: &str,
        address: &str,
        identity: &str,
        root_fingerprint: &str,
        ttl: Duration,
    ) -> Self {
        let payload = TokenPayload {
            cluster: cluster.into(),
            trust_domain: trust_domain.into(),
            address: address.into(),
            identity: identity.into(),
            root_fingerprint: root_fingerprint.into(),
            token_id: hex::encode(rand::random::<[u8; 8]>()),
            secret: hex::encode(rand::random::<[u8; 32]>()),
            expires: now_unix() + ttl.as_secs(),
        };
        let body = serde_json::to_vec(&payload).expect("serializable");
        let tag = mac(&payload.secret, &body);
        let encoded = format!(
            "{TOKEN_PREFIX}.{}.{}",
            URL_SAFE_NO_PAD.encode(&body),
            URL_SAFE_NO_PAD.encode(tag)
        );
        Self { payload, encoded }
    }

    /// Decodes and checks the MAC and expiry.
    pub fn decode(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        let mut parts = text.split('.');
        if parts.next() != Some(TOKEN_PREFIX) {
            return Err(TokenError::Format);
        }
        let (Some(body), Some(tag), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(TokenError::Format);
        };
        let body = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Tampered)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Tampered)?;
        let payload: TokenPayload =
            serde_json::from_slice(&body).map_err(|_| TokenError::Tampered)?;
        if !verify_mac(&payload.secret, &body, &tag) {
            return Err(TokenError::Tampered);
        }
        if now_unix() >= payload.expires {
            return Err(TokenError::Expired(rfc3339(payload.expires)));
        }
        Ok(Self {
            payload,
            encoded: text.to_owned(),
        })
    }

    /// The joining cluster's proof of the secret: an HMAC over the exact
    /// token and its own name.
    pub fn proof(&self, joining_cluster: &str) -> Vec<u8> {
        mac(
            &self.payload.secret,
            format!("{}|{joining_cluster}", self.encoded).as_bytes(),
        )
    }
}

/// A token as the issuing controller keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IssuedToken {
    pub encoded: String,
    pub secret: String,
    pub expires: u64,
    pub used_by: Option<String>,
}

/// The issued tokens of one controller, in `<stateDir>/link-tokens.json`.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

impl TokenStore {
    /// Tokens live one per file under `<stateDir>/link-tokens/`, so
    /// `isthmus link create` adding one never races the running
    /// controller marking another used (one shared file lost updates:
    /// a token created while another was redeemed could vanish).
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("link-tokens"),
        }
    }

    fn path(&self, token_id: &str) -> Option<PathBuf> {
        (!token_id.is_empty() && token_id.bytes().all(|b| b.is_ascii_alphanumeric()))
            .then(|| self.dir.join(format!("{token_id}.json")))
    }

    fn load(&self, token_id: &str) -> Option<IssuedToken> {
        let bytes = std::fs::read(self.path(token_id)?).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn save(&self, token_id: &str, token: &IssuedToken) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self
            .path(token_id)
            .ok_or_else(|| std::io::Error::other("invalid token id"))?;
        let data = serde_json::to_vec_pretty(token).map_err(std::io::Error::other)?;
        isthmus_core::identity::write_atomic(&path, &data, true)
    }

    /// Records a newly created token.
    pub fn add(&self, token: &Token) -> std::io::Result<()> {
        // Forget tokens that expired a day ago or more.
        let now = now_unix();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let old = std::fs::read(e.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<IssuedToken>(&b).ok())
                    .is_some_and(|t| t.expires + 86_400 <= now);
                if old {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        self.save(&token.payload.token_id, &IssuedToken::new(token))
    }

    /// Checks a Link request and marks the token used. `presented` is the
    /// token as the joining side has it.
    pub fn redeem(
        &self,
        token_id: &str,
        presented: &str,
        joining_cluster: &str,
        proof: &[u8],
    ) -> Result<(), TokenError> {
        let Some(mut t) = self.load(token_id) else {
            return Err(TokenError::Unknown(token_id.to_owned()));
        };
        if check_redeem(&mut t, presented, joining_cluster, proof)? {
            self.save(token_id, &t)
                .map_err(|_| TokenError::Unknown(token_id.to_owned()))?;
        }
        Ok(())
    }
}

/// Checks a Link request against an issued token and marks it used by
/// `joining_cluster`; whether the token changed (and must be saved).
pub fn check_redeem(
    t: &mut IssuedToken,
    presented: &str,
    joining_cluster: &str,
    proof: &[u8],
) -> Result<bool, TokenError> {
    if presented != t.encoded
        || !verify_mac(
            &t.secret,
            format!("{}|{joining_cluster}", t.encoded).as_bytes(),
            proof,
        )
    {
        return Err(TokenError::Tampered);
    }
    if now_unix() >= t.expires {
        return Err(TokenError::Expired(rfc3339(t.expires)));
    }
    if let Some(by) = &t.used_by {
        // The same cluster again (its proof binds its name): its first
        // attempt went through but the answer was lost, so it retries.
        // Answer again rather than strand the link; anyone else is
        // refused.
        if by == joining_cluster {
            return Ok(false);
        }
        return Err(TokenError::Reused(by.clone()));
    }
    t.used_by = Some(joining_cluster.to_owned());
    Ok(true)
}

impl IssuedToken {
    /// The record of a newly created token.
    pub fn new(token: &Token) -> Self {
        Self {
            encoded: token.encoded.clone(),
            secret: token.payload.secret.clone(),
            expires: token.payload.expires,
            used_by: None,
        }
    }

    /// Whether it expired a day ago or more (and can be forgotten).
    pub fn is_old(&self) -> bool {
        self.expires + 86_400 <= now_unix()
    }
}

/// A peer learned by linking, in `<stateDir>/peers/<name>.yaml`; the
/// controller watches that directory and adds peers as they appear.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerFile {
    pub name: String,
    pub address: String,
    pub trust_domain: String,
    /// The peer's roots, PEM; empty while a link is pending.
    #[serde(default)]
    pub trust_bundle_pem: String,
    /// The token to redeem on first contact (joining side only).
    #[serde(default)]
    pub pending_token: Option<String>,
    /// Why redeeming the token failed for good (not retried).
    #[serde(default)]
    pub link_error: Option<String>,
}

impl PeerFile {
    /// A peer to link with by redeeming `token` (the joining side).
    pub fn pending(token: &Token) -> Self {
        Self {
            name: token.payload.cluster.clone(),
            address: token.payload.address.clone(),
            trust_domain: token.payload.trust_domain.clone(),
            trust_bundle_pem: String::new(),
            pending_token: Some(token.encoded.clone()),
            link_error: None,
        }
    }

    pub fn path(state_dir: &Path, name: &str) -> PathBuf {
        state_dir.join("peers").join(format!("{name}.yaml"))
    }

    pub fn write(&self, state_dir: &Path) -> std::io::Result<()> {
        let path = Self::path(state_dir, &self.name);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        let text = serde_saphyr::to_string(self).map_err(std::io::Error::other)?;
        isthmus_core::identity::write_atomic(&path, text.as_bytes(), false)
    }

    /// Every peer file in `state_dir/peers`. Unreadable ones are skipped
    /// with a warning.
    pub fn load_all(state_dir: &Path) -> Vec<PeerFile> {
        let Ok(dir) = std::fs::read_dir(state_dir.join("peers")) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in dir.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "yaml") {
                continue;
            }
            match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_saphyr::from_str::<PeerFile>(&t).map_err(|e| e.to_string()))
            {
                Ok(p) => out.push(p),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "unreadable peer file skipped")
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(ttl: Duration) -> Token {
        Token::create(
            "east",
            "east.local",
            "127.0.1.1:15012",
            "spiffe://east.local/cluster/east/controller",
            "ab",
            ttl,
        )
    }

    #[test]
    fn tokens_round_trip_and_tampering_is_caught() {
        let t = token(Duration::from_secs(60));
        assert_eq!(Token::decode(&t.encoded).unwrap(), t);
        // Change the address inside the payload.
        let mut parts: Vec<String> = t.encoded.split('.').map(str::to_owned).collect();
        let mut body: TokenPayload =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
        body.address = "evil.example:15012".into();
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&body).unwrap());
        assert_eq!(Token::decode(&parts.join(".")), Err(TokenError::Tampered));
        assert_eq!(Token::decode("hello"), Err(TokenError::Format));
        assert!(matches!(
            Token::decode(&token(Duration::ZERO).encoded),
            Err(TokenError::Expired(_))
        ));
    }

    #[test]
    fn the_store_redeems_once_and_names_each_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        let t = token(Duration::from_secs(60));
        store.add(&t).unwrap();
        let id = &t.payload.token_id;
        assert_eq!(
            store.redeem("nope", &t.encoded, "west", &t.proof("west")),
            Err(TokenError::Unknown("nope".into()))
        );
        assert_eq!(
            store.redeem(id, &t.encoded, "west", &t.proof("eu")),
            Err(TokenError::Tampered)
        );
        assert_eq!(
            store.redeem(id, &format!("{}x", t.encoded), "west", &t.proof("west")),
            Err(TokenError::Tampered)
        );
        store
            .redeem(id, &t.encoded, "west", &t.proof("west"))
            .unwrap();
        // West retrying (its answer was lost) is answered again…
        store
            .redeem(id, &t.encoded, "west", &t.proof("west"))
            .unwrap();
        // …anyone else is refused.
        assert_eq!(
            store.redeem(id, &t.encoded, "eu", &t.proof("eu")),
            Err(TokenError::Reused("west".into()))
        );
        let old = token(Duration::ZERO);
        store.add(&old).unwrap();
        assert!(matches!(
            store.redeem(
                &old.payload.token_id,
                &old.encoded,
                "west",
                &old.proof("west")
            ),
            Err(TokenError::Expired(_))
        ));
    }
}
