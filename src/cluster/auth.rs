//! Proof of the cluster secret on every internal call: a keyed BLAKE3 hash, under a key
//! derived from the secret, of a timestamp, the call's scope and its body, in the call's
//! metadata. A call whose proof is missing, wrong or older than [`MAX_SKEW_MS`] is refused
//! before anything is decoded. The secret itself never leaves the process and is never
//! logged.
//!
//! Every replicated byte is hashed twice (signed by the leader, checked by the follower),
//! so the hash is on the publish path: keyed BLAKE3 costs a fraction of HMAC-SHA256 there
//! (it hashes a replication batch's 1 KiB chunks side by side). Keys derived for other
//! uses ([`Secret::derive_key`]) stay HMAC-SHA256, so they do not change with the proof.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Metadata key of the timestamp (ms since the Unix epoch).
pub const TS_KEY: &str = "x-qit-ts";
/// Metadata key of the proof (hex).
pub const MAC_KEY: &str = "x-qit-mac";
/// Largest clock difference (and replay window) accepted, in ms.
pub const MAX_SKEW_MS: i64 = 60_000;
/// Shortest secret accepted.
pub const MIN_SECRET_LEN: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// The context the proof key is derived under (see [`blake3::derive_key`]).
const PROOF_KEY_CONTEXT: &str = "qit cluster call proof 2026-12 v2";

/// The shared secret (its `Debug` hides it).
#[derive(Clone)]
pub struct Secret {
    secret: Vec<u8>,
    /// The key of the calls' proofs, derived from the secret.
    proof_key: [u8; 32],
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Wraps the secret.
    pub fn new(secret: &str) -> Self {
        Self {
            secret: secret.as_bytes().to_vec(),
            proof_key: blake3::derive_key(PROOF_KEY_CONTEXT, secret.as_bytes()),
        }
    }

    /// HMAC-SHA256 of the secret over a timestamp, a scope and a body.
    fn hmac(&self, ts: i64, scope: &[u8], body: &[u8]) -> HmacSha256 {
        // HMAC takes keys of any length: this cannot fail.
        let mut mac = match HmacSha256::new_from_slice(&self.secret) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts every key length"),
        };
        mac.update(&ts.to_le_bytes());
        mac.update(&(scope.len() as u64).to_le_bytes());
        mac.update(scope);
        mac.update(body);
        mac
    }

    /// The proof of a call: the keyed hash of its timestamp, scope and body.
    fn proof(&self, ts: i64, scope: &[u8], body: &[u8]) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new_keyed(&self.proof_key);
        hasher.update(&ts.to_le_bytes());
        hasher.update(&(scope.len() as u64).to_le_bytes());
        hasher.update(scope);
        hasher.update(body);
        hasher.finalize()
    }

    /// A key for another use derived from the secret (hex of an HMAC over `label`): every
    /// node derives the same one, and it tells nothing about the secret.
    pub fn derive_key(&self, label: &[u8]) -> String {
        let tag = self.hmac(0, b"derive", label).finalize().into_bytes();
        tag.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The proof for a call with this timestamp, scope (method and group) and body.
    pub fn sign(&self, ts: i64, scope: &[u8], body: &[u8]) -> String {
        self.proof(ts, scope, body).to_hex().to_string()
    }

    /// True when `proof` is this secret's proof for the call and `ts` is within
    /// [`MAX_SKEW_MS`] of `now`. Compares in constant time.
    pub fn verify(&self, now: i64, ts: i64, scope: &[u8], body: &[u8], proof: &str) -> bool {
        (now - ts).abs() <= MAX_SKEW_MS && self.verify_tag(ts, scope, body, proof)
    }

    /// The proof of message `seq` of stream `stream` (an id the stream's opener chose and
    /// signed when it opened it): a message is bound to its stream and its place in it, so
    /// it cannot be replayed into another stream, nor repeated or reordered in its own.
    pub fn sign_in_stream(&self, stream: &[u8], seq: u64, body: &[u8]) -> String {
        self.sign(stream_ts(seq), &stream_scope(stream), body)
    }

    /// True when `proof` is [`Self::sign_in_stream`]'s proof for this message.
    pub fn verify_in_stream(&self, stream: &[u8], seq: u64, body: &[u8], proof: &str) -> bool {
        self.verify_tag(stream_ts(seq), &stream_scope(stream), body, proof)
    }

    fn verify_tag(&self, ts: i64, scope: &[u8], body: &[u8], proof: &str) -> bool {
        // `Hash` compares in constant time.
        blake3::Hash::from_hex(proof).is_ok_and(|tag| tag == self.proof(ts, scope, body))
    }
}

/// The scope of a stream's messages.
fn stream_scope(stream: &[u8]) -> Vec<u8> {
    [b"stream/".as_slice(), stream].concat()
}

/// A message's sequence number where a call has its timestamp.
fn stream_ts(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A proof verifies with the same secret, call and time, and with nothing else.
        #[test]
        fn only_the_right_secret_and_body_verify(
            body in proptest::collection::vec(any::<u8>(), 0..64),
            flip in any::<usize>(),
        ) {
            let secret = Secret::new("a-cluster-secret-of-some-length");
            let proof = secret.sign(1_000, b"raft/3", &body);
            prop_assert!(secret.verify(1_000, 1_000, b"raft/3", &body, &proof));
            prop_assert!(!Secret::new("another-secret-of-some-length").verify(1_000, 1_000, b"raft/3", &body, &proof));
            prop_assert!(!secret.verify(1_000, 1_000, b"raft/4", &body, &proof));
            prop_assert!(!secret.verify(1_000 + MAX_SKEW_MS + 1, 1_000, b"raft/3", &body, &proof));
            if !body.is_empty() {
                let mut other = body.clone();
                let i = flip % other.len();
                other[i] ^= 1;
                prop_assert!(!secret.verify(1_000, 1_000, b"raft/3", &other, &proof));
            }
            prop_assert!(!secret.verify(1_000, 1_000, b"raft/3", &body, "zz"));
        }
    }

    /// A stream's message verifies only in its stream, at its place, with its body.
    #[test]
    fn a_stream_message_is_bound_to_its_stream_and_place() {
        let secret = Secret::new("a-cluster-secret-of-some-length");
        let proof = secret.sign_in_stream(b"s1", 3, b"body");
        assert!(secret.verify_in_stream(b"s1", 3, b"body", &proof));
        assert!(!secret.verify_in_stream(b"s2", 3, b"body", &proof));
        assert!(!secret.verify_in_stream(b"s1", 4, b"body", &proof));
        assert!(!secret.verify_in_stream(b"s1", 3, b"bodY", &proof));
        let other = Secret::new("another-secret-of-some-length");
        assert!(!other.verify_in_stream(b"s1", 3, b"body", &proof));
    }

    /// A derived key is the HMAC-SHA256 it always was: keys derived before the proofs
    /// moved to BLAKE3 (the signing key of issued tokens) stay the same.
    #[test]
    fn derived_keys_do_not_change() {
        let key = Secret::new("a-cluster-secret-of-some-length").derive_key(b"label");
        let mut mac = HmacSha256::new_from_slice(b"a-cluster-secret-of-some-length").unwrap();
        mac.update(&0i64.to_le_bytes());
        mac.update(&6u64.to_le_bytes());
        mac.update(b"derive");
        mac.update(b"label");
        let expected: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(key, expected);
    }

    #[test]
    fn debug_hides_the_secret() {
        assert_eq!(
            format!("{:?}", Secret::new("hunter2-hunter2-hunter2")),
            "Secret(..)"
        );
    }
}
