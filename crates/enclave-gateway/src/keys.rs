//! API keys: `enc_<id>_<secret>`, the id public (16 hex digits, shown by `keys list`), the
//! secret 256 random bits. Only the SHA-256 of the whole key is stored; a salted slow hash is
//! not needed because the key is random, not chosen by a person (as GitHub's tokens).

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The recognisable start of every key (secret scanners can look for it).
pub const KEY_PREFIX: &str = "enc_";
const ID_HEX: usize = 16;
const SECRET_HEX: usize = 64;

/// A new key: its id and the full key, which is shown once and never stored.
pub(crate) struct NewSecret {
    pub id: String,
    pub key: String,
    pub sha256: String,
}

pub(crate) fn generate() -> NewSecret {
    let mut bytes = [0u8; ID_HEX / 2 + SECRET_HEX / 2];
    // `rand::rng()` is a CSPRNG seeded from the operating system.
    rand::rng().fill_bytes(&mut bytes);
    let hex = to_hex(&bytes);
    let (id, secret) = hex.split_at(ID_HEX);
    let key = format!("{KEY_PREFIX}{id}_{secret}");
    NewSecret {
        id: id.to_string(),
        sha256: sha256_hex(&key),
        key,
    }
}

/// The id of a well-formed key, `None` for anything else (never an error: what a client sent
/// is not worth describing back).
pub fn key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (hex(id, ID_HEX) && hex(secret, SECRET_HEX)).then_some(id)
}

/// Whether `key` hashes to `stored_sha256`, compared in constant time.
pub(crate) fn matches(key: &str, stored_sha256: &str) -> bool {
    sha256_hex(key)
        .as_bytes()
        .ct_eq(stored_sha256.as_bytes())
        .into()
}

fn sha256_hex(key: &str) -> String {
    to_hex(&Sha256::digest(key.as_bytes()))
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_reject_lookalikes() {
        let a = generate();
        let b = generate();
        assert_ne!(a.key, b.key);
        assert!(a.key.starts_with(KEY_PREFIX));
        assert_eq!(key_id(&a.key), Some(a.id.as_str()));
        assert!(matches(&a.key, &a.sha256));
        assert!(!matches(&b.key, &a.sha256));
        // The hash is of the key, not the key itself.
        assert!(!a.sha256.contains(&a.key[KEY_PREFIX.len() + ID_HEX + 1..]));
        for bad in [
            "",
            "enc_",
            "sk-abc",
            &a.key[..a.key.len() - 1],
            &format!("{}0", a.key),
            &a.key.to_uppercase(),
            &a.key.replace("enc_", "enx_"),
        ] {
            assert_eq!(key_id(bad), None, "{bad}");
        }
    }
}
