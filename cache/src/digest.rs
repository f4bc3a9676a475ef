//! Content digests (blake3) and the deterministic stage-key builder.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A blake3 digest. Shown, parsed and serialised as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

/// A string that is not 64 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("invalid digest {text:?}: expected 64 hex digits")]
pub struct DigestParseError {
    pub text: String,
}

impl Digest {
    pub fn of_bytes(b: &[u8]) -> Digest {
        Digest(*blake3::hash(b).as_bytes())
    }

    pub fn hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// First 12 hex digits: enough to tell keys apart in logs and `status`.
    pub fn short(&self) -> String {
        let mut h = self.hex();
        h.truncate(12);
        h
    }
}

impl From<blake3::Hash> for Digest {
    fn from(h: blake3::Hash) -> Self {
        Digest(*h.as_bytes())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // blake3 accepts upper case too; we require the canonical lowercase form
        // so that a digest has exactly one spelling (file names, records).
        let canonical = s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !canonical {
            return Err(DigestParseError { text: s.to_owned() });
        }
        blake3::Hash::from_hex(s).map(Digest::from).map_err(|_| DigestParseError { text: s.to_owned() })
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Builds a stage key from named fields, deterministically.
///
/// Every name and value is length-prefixed (u64 little endian), so
/// `("ab", "c")` and `("a", "bc")` give different keys, and the schema version
/// comes first so that changing how keys are built invalidates all of them.
#[derive(Clone)]
pub struct KeyHasher {
    hasher: blake3::Hasher,
}

/// Domain separation: a key can never collide with the digest of a file whose
/// bytes happen to equal the key encoding.
const KEY_CONTEXT: &str = "medreason-pipeline 2025 stage key";

impl KeyHasher {
    pub fn new(schema_version: u32) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key(KEY_CONTEXT);
        hasher.update(&schema_version.to_le_bytes());
        KeyHasher { hasher }
    }

    pub fn field(&mut self, name: &str, value: &[u8]) -> &mut Self {
        self.hasher.update(&(name.len() as u64).to_le_bytes());
        self.hasher.update(name.as_bytes());
        self.hasher.update(&(value.len() as u64).to_le_bytes());
        self.hasher.update(value);
        self
    }

    pub fn finish(&self) -> Digest {
        self.hasher.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_bytes_is_blake3_and_stable() {
        // Reference value from the blake3 test vectors (empty input).
        assert_eq!(Digest::of_bytes(b"").hex(), "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262");
        assert_eq!(Digest::of_bytes(b"abc"), Digest::of_bytes(b"abc"));
        assert_ne!(Digest::of_bytes(b"abc"), Digest::of_bytes(b"abd"));
    }

    #[test]
    fn hex_round_trip_display_serde_and_short() {
        let d = Digest::of_bytes(b"hello");
        let text = d.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<Digest>().unwrap(), d);
        assert_eq!(d.short(), text[..12]);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
    }

    #[test]
    fn parse_rejects_bad_text() {
        for bad in ["", "abc", &"g".repeat(64), &"A".repeat(64), &"0".repeat(65)] {
            let err = bad.parse::<Digest>().unwrap_err();
            assert!(err.to_string().contains("64 hex digits"), "{err}");
        }
        assert!(serde_json::from_str::<Digest>("\"xyz\"").is_err());
    }

    const PINNED_KEY: &str = "c50cbc0d1d304c5ce622f2b98c1d12e2e9563c6440e467ee4eeac3f9b24dcab7";

    #[test]
    fn key_is_deterministic_and_order_sensitive() {
        let key = |fields: &[(&str, &[u8])]| {
            let mut h = KeyHasher::new(1);
            for (n, v) in fields {
                h.field(n, v);
            }
            h.finish()
        };
        let a = key(&[("kind", b"phantom"), ("seed", b"17")]);
        assert_eq!(a, key(&[("kind", b"phantom"), ("seed", b"17")]));
        assert_ne!(a, key(&[("seed", b"17"), ("kind", b"phantom")]));
        assert_ne!(a, key(&[("kind", b"phantom"), ("seed", b"18")]));
        // Pinned value: a change to the encoding must be a deliberate schema bump.
        assert_eq!(key(&[("kind", b"phantom")]).hex(), PINNED_KEY);
    }

    #[test]
    fn key_field_boundaries_are_unambiguous() {
        let mut a = KeyHasher::new(1);
        a.field("ab", b"c");
        let mut b = KeyHasher::new(1);
        b.field("a", b"bc");
        assert_ne!(a.finish(), b.finish());

        // Splitting one value across two fields differs from one field.
        let mut c = KeyHasher::new(1);
        c.field("x", b"12");
        let mut d = KeyHasher::new(1);
        d.field("x", b"1").field("", b"2");
        assert_ne!(c.finish(), d.finish());
    }

    #[test]
    fn schema_version_changes_every_key() {
        let mut a = KeyHasher::new(1);
        a.field("kind", b"phantom");
        let mut b = KeyHasher::new(2);
        b.field("kind", b"phantom");
        assert_ne!(a.finish(), b.finish());
        // finish() does not consume: calling it twice gives the same key.
        assert_eq!(a.finish(), a.finish());
    }
}
