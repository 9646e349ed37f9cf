//! The per-machine provisioning token: what lets an installer running on a
//! machine mark that machine, and only that one, as provisioned.
//!
//! A token is the HMAC-SHA256 of the machine's MAC under a key only pxed
//! holds (derived from the API token), so pxed can render it into any
//! machine's script or kernel command line (`{{provision_token}}`) and check
//! it later without storing one per machine. A token names its MAC: it
//! cannot be replayed for another.

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use super::Mac;

/// Where the installer reports a machine done, on the API listener and on
/// the boot HTTP listener (machines reach the latter; the API listener is
/// usually on a management network).
pub const PROVISIONED_PATH: &str = "/api/v1/machines/{mac}/provisioned";

/// Hex digits of a token: 128 bits of the MAC.
const TOKEN_HEX: usize = 32;

#[derive(Clone)]
pub struct ProvisionKey {
    key: Vec<u8>,
}

impl std::fmt::Debug for ProvisionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProvisionKey(..)")
    }
}

impl ProvisionKey {
    /// A key from a secret (the API token). The secret is domain-separated
    /// so that a token never equals anything else derived from it.
    pub fn from_secret(secret: &[u8]) -> Self {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(b"pxed provision token key v1");
        Self {
            key: mac.finalize().into_bytes().to_vec(),
        }
    }

    /// The token of the machine with this MAC.
    pub fn token(&self, mac: Mac) -> String {
        let digest = self.hmac(mac).finalize().into_bytes();
        let mut hex = String::with_capacity(TOKEN_HEX);
        for byte in &digest[..TOKEN_HEX / 2] {
            hex.push_str(&format!("{byte:02x}"));
        }
        hex
    }

    /// Whether `token` is this machine's, compared in constant time.
    pub fn verify(&self, mac: Mac, token: &str) -> bool {
        let Some(bytes) = decode_hex(token) else {
            return false;
        };
        bytes.len() == TOKEN_HEX / 2 && self.hmac(mac).verify_truncated_left(&bytes).is_ok()
    }

    fn hmac(&self, mac: Mac) -> Hmac<Sha256> {
        let mut h = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        h.update(&mac.0);
        h
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_its_own_machine_only_and_needs_the_key() {
        let key = ProvisionKey::from_secret(b"api secret");
        let a = Mac([2, 0, 0, 0, 0, 1]);
        let b = Mac([2, 0, 0, 0, 0, 2]);
        let token = key.token(a);
        assert_eq!(token.len(), TOKEN_HEX);
        assert!(key.verify(a, &token));
        assert!(!key.verify(b, &token), "not another machine's");
        assert!(
            !ProvisionKey::from_secret(b"other").verify(a, &token),
            "not under another key"
        );
        assert!(!key.verify(a, &token[..30]), "not a prefix");
        assert!(!key.verify(a, "zz"), "not garbage");
        assert_eq!(key.token(a), token, "stable across calls");
    }
}
