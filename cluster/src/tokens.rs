//! API token secrets, their keyed hashes, and the checks a gateway makes with them.
//!
//! A token's secret looks like `cht_<id>_<key>`: `id` (16 hex digits) names the
//! [`TokenRecord`] in the replicated state, `key` is 32 random bytes in URL-safe base64.
//! The state keeps only `HMAC-SHA256(token_key, key)`; the token key is derived from the
//! cluster's cookie, which every member has and which is never replicated or stored in
//! sled, so a copy of the state or of the Raft log gives neither the secrets nor a way to
//! test guesses offline. Rotating the cookie invalidates every token.
//!
//! Also here: glob patterns for the models a token may use, and CIDR allow-lists.

use std::net::IpAddr;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::state::TokenRecord;

type HmacSha256 = Hmac<Sha256>;

/// The prefix of every secret.
pub const SECRET_PREFIX: &str = "cht_";

/// The key token hashes are made with.
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length: new_from_slice cannot fail.
    match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

impl TokenKey {
    /// The key of a cluster with this cookie.
    pub fn from_cookie(cookie: &str) -> TokenKey {
        let mut m = mac(cookie.as_bytes());
        m.update(b"cohort api token key v1");
        TokenKey(m.finalize().into_bytes().into())
    }

    /// The keyed hash of a secret's key part.
    pub fn hash(&self, key: &str) -> Vec<u8> {
        let mut m = mac(&self.0);
        m.update(key.as_bytes());
        m.finalize().into_bytes().to_vec()
    }

    /// Whether `key` hashes to `hash` (in constant time).
    pub fn verify(&self, key: &str, hash: &[u8]) -> bool {
        let mut m = mac(&self.0);
        m.update(key.as_bytes());
        m.verify_slice(hash).is_ok()
    }

    /// A new token id, its secret (to show once), and the hash to store.
    pub fn mint(&self) -> Result<MintedSecret, getrandom::Error> {
        let mut id = [0u8; 8];
        let mut key = [0u8; 32];
        getrandom::fill(&mut id)?;
        getrandom::fill(&mut key)?;
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key);
        let hash = self.hash(&key);
        Ok(MintedSecret {
            secret: format!("{SECRET_PREFIX}{id}_{key}"),
            id,
            hash,
        })
    }
}

/// A freshly made token secret.
#[derive(Debug, Clone)]
pub struct MintedSecret {
    /// The token's id.
    pub id: String,
    /// What the client sends (`cht_<id>_<key>`); shown once.
    pub secret: String,
    /// What the state keeps.
    pub hash: Vec<u8>,
}

/// Splits a secret into its id and key parts; `None` if it is not shaped like one.
pub fn parse_secret(secret: &str) -> Option<(&str, &str)> {
    let rest = secret.strip_prefix(SECRET_PREFIX)?;
    let (id, key) = rest.split_once('_')?;
    let id_ok = id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit());
    let key_ok = (40..=64).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (id_ok && key_ok).then_some((id, key))
}

/// Whether `name` matches a glob `pattern`: `*` any run of characters, `?` one character,
/// anything else itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Checks a model-name glob pattern.
pub fn valid_glob(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern.len() <= 128
        && pattern
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.*?".contains(c))
}

/// Parses an allow-list entry: a CIDR (`10.0.0.0/8`, `fd00::/8`) or one address.
pub fn parse_cidr(entry: &str) -> Option<ipnet::IpNet> {
    let entry = entry.trim();
    if let Ok(net) = entry.parse::<ipnet::IpNet>() {
        return Some(net.trunc());
    }
    entry.parse::<IpAddr>().ok().map(ipnet::IpNet::from)
}

/// Whether `ip` is in any of the allow-list's entries (an IPv4-mapped IPv6 address counts
/// as its IPv4 address).
pub fn ip_allowed(allow: &[String], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    allow
        .iter()
        .filter_map(|e| parse_cidr(e))
        .any(|net| net.contains(&ip))
}

impl TokenRecord {
    /// A new active token for `minted`, with no limits: every model, any address, no rate
    /// limit, no quota, no expiry.
    pub fn new(
        minted: &MintedSecret,
        name: &str,
        role: crate::state::TokenRole,
        created_at_ms: u64,
        created_by: &str,
    ) -> TokenRecord {
        TokenRecord {
            id: minted.id.clone(),
            name: name.to_string(),
            key_hash: minted.hash.clone(),
            role,
            allowed_models: Vec::new(),
            ip_allow: Vec::new(),
            rate_per_minute: None,
            monthly_quota: None,
            used: 0,
            used_month: 0,
            expires_at_ms: None,
            status: crate::state::TokenStatus::Active,
            created_at_ms,
            created_by: created_by.to_string(),
        }
    }

    /// Whether this token may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models.is_empty() || self.allowed_models.iter().any(|p| glob_match(p, model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_secrets_verify_and_others_do_not() {
        let key = TokenKey::from_cookie("cookie");
        let m = key.mint().unwrap();
        let (id, k) = parse_secret(&m.secret).unwrap();
        assert_eq!(id, m.id);
        assert!(key.verify(k, &m.hash));
        let mut other = k.to_string();
        other.replace_range(0..1, if k.starts_with('A') { "B" } else { "A" });
        assert!(!key.verify(&other, &m.hash));
        assert!(!TokenKey::from_cookie("another cookie").verify(k, &m.hash));
        assert_ne!(key.mint().unwrap().secret, m.secret);
    }

    #[test]
    fn secrets_of_the_wrong_shape_are_refused() {
        for s in [
            "",
            "cht_",
            "Bearer x",
            "cht_0123456789abcdef",
            "cht_0123456789abcdeg_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "cht_0123456789abcdef_short",
            "cht_0123456789abcdef_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa%aa",
        ] {
            assert!(parse_secret(s).is_none(), "{s:?}");
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("bert-*", "bert-base"));
        assert!(!glob_match("bert-*", "xbert-base"));
        assert!(glob_match("m?p", "mlp"));
        assert!(!glob_match("m?p", "mllp"));
        assert!(glob_match("*-v?", "minilm-v2"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("mlp", "mlp"));
        assert!(!glob_match("mlp", "mlp2"));
        assert!(valid_glob("bert-*"));
        assert!(!valid_glob("a/b"));
        assert!(!valid_glob(""));
    }

    #[test]
    fn cidrs() {
        let allow = vec!["10.0.0.0/8".to_string(), "192.168.1.7".to_string()];
        assert!(ip_allowed(&allow, "10.1.2.3".parse().unwrap()));
        assert!(ip_allowed(&allow, "192.168.1.7".parse().unwrap()));
        assert!(!ip_allowed(&allow, "192.168.1.8".parse().unwrap()));
        assert!(ip_allowed(&allow, "::ffff:10.0.0.1".parse().unwrap()));
        assert!(!ip_allowed(&[], "10.0.0.1".parse().unwrap()));
        assert!(parse_cidr("fd00::/8").is_some());
        assert!(parse_cidr("10.0.0.1/33").is_none());
        assert!(parse_cidr("nope").is_none());
    }

    #[test]
    fn months() {
        use crate::state::{month_of, next_month_start_ms};
        // 2026-11-22T00:00:00Z
        let t = 1_795_305_600_000;
        assert_eq!(month_of(t), 202611);
        // 2026-12-01T00:00:00Z
        assert_eq!(next_month_start_ms(t), 1_796_083_200_000);
        assert_eq!(month_of(1_796_083_200_000), 202612);
        assert_eq!(month_of(1_796_083_199_999), 202611);
        assert_eq!(month_of(0), 197001);
        // December rolls over to January.
        assert_eq!(month_of(next_month_start_ms(1_796_083_200_000)), 202701);
    }
}
