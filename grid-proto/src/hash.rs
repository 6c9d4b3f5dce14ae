//! Content hashes. Modules, inputs and outputs are named by the SHA-256 of their bytes.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// A SHA-256 digest, shown and serialized as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Sha256Hex(pub [u8; 32]);

impl Sha256Hex {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Finishes an incremental hasher.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Self(hasher.finalize().into())
    }
}

impl fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::str::FromStr for Sha256Hex {
    type Err = String;

    /// 64 hex digits.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(s, &mut digest)
            .map_err(|e| format!("{s:?} is not a SHA-256 in hex: {e}"))?;
        Ok(Self(digest))
    }
}

impl fmt::Debug for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Hex({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_of_empty_input_is_the_well_known_digest() {
        assert_eq!(
            Sha256Hex::of(b"").to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn hex_parses_back_and_bad_hex_is_refused() {
        let sha = Sha256Hex::of(b"grid");
        assert_eq!(sha.to_string().parse::<Sha256Hex>(), Ok(sha));
        assert!("xyz".parse::<Sha256Hex>().is_err());
        assert!("ab".parse::<Sha256Hex>().is_err());
    }
}
