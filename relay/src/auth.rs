//! Tokens that may open tunnels, compared in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Identifies the token a client presented (its SHA-256), without keeping the token itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenId(pub [u8; 32]);

/// The set of accepted tokens, kept only as SHA-256 digests.
#[derive(Clone)]
pub struct TokenSet {
    digests: Vec<[u8; 32]>,
}

impl TokenSet {
    /// Builds the set from clear-text tokens.
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(tokens: I) -> Self {
        TokenSet {
            digests: tokens
                .into_iter()
                .map(|t| sha256(t.as_ref().as_bytes()))
                .collect(),
        }
    }

    /// Number of accepted tokens.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Whether no token is accepted.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Checks `presented` against every accepted token without an early exit, comparing
    /// fixed-length digests so neither content nor length leaks through timing.
    pub fn verify(&self, presented: &str) -> Option<TokenId> {
        let digest = sha256(presented.as_bytes());
        let mut found = subtle::Choice::from(0);
        for known in &self.digests {
            found |= known.ct_eq(&digest);
        }
        bool::from(found).then_some(TokenId(digest))
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_known_tokens_only() {
        let set = TokenSet::new(["alpha", "beta"]);
        assert_eq!(set.verify("alpha"), Some(TokenId(sha256(b"alpha"))));
        assert!(set.verify("beta").is_some());
        assert!(set.verify("alph").is_none());
        assert!(set.verify("").is_none());
    }
}
