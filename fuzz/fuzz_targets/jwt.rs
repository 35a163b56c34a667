//! Tokens are client input (the `apikey` at the upgrade, `access_token` in joins and
//! pushes): verification must never panic, and must accept only what it documents.
//!
//! The first byte picks how the rest becomes a token, so that the fuzzer does not have to
//! discover base64 or an HMAC before it reaches the deeper code:
//! - 0: the bytes as the token text (percent-decoding, whitespace, the compact shape);
//! - 1: `header ⟂ payload ⟂ signature` (split at 0xFF), each base64url-encoded: the header
//!   parser that picks the key (`alg`, `kid`) and the library's decoding;
//! - 2: `header ⟂ payload`, signed with the configured secret for real: the claims checks
//!   that run only after a signature verified;
//! - 3: the bytes as a JWKS document (operator configuration, but a parser all the same).
//!
//! Everything goes through the public `JwtVerifier`, as the server calls it.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use walcast_server::auth::{JwtError, JwtVerifier};

const SECRET: &str = "fuzz-secret-fuzz-secret-fuzz-secret!";
/// The server tests' JWKS: one RSA, P-256, P-384, Ed25519 and `oct` key, each with a `kid`.
const JWKS: &str = include_str!("../../crates/walcast-server/tests/fixtures/jwt/jwks.json");
const NOW: i64 = 1_700_000_000;

fn verifier() -> &'static JwtVerifier {
    static V: std::sync::OnceLock<JwtVerifier> = std::sync::OnceLock::new();
    V.get_or_init(|| JwtVerifier::new(Some(SECRET), Some(JWKS)).expect("the fixture JWKS is valid"))
}

fn verify(v: &JwtVerifier, token: &str) {
    let result = v.verify(token, NOW);
    assert_eq!(
        result,
        v.verify(token, NOW),
        "verification is deterministic"
    );
    match result {
        Ok(claims) => {
            assert!(!claims.role.is_empty(), "accepted without a role");
            assert!(claims.exp > NOW, "accepted an expired token");
            let json: serde_json::Value =
                serde_json::from_str(&claims.claims_json()).expect("claims JSON parses");
            assert!(json.is_object(), "claims are an object");
        }
        Err(e) => {
            assert!(
                !matches!(e, JwtError::Missing),
                "verify never reports Missing"
            );
            if let JwtError::Expired { seconds_ago } = e {
                assert!(seconds_ago >= 0);
            }
            // Every refusal has its wire texts.
            assert!(!e.upgrade_message().is_empty());
            assert!(e.join_reason().contains(": "));
        }
    }
}

fn b64(part: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(part)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let v = verifier();
    match mode % 4 {
        0 => verify(v, &String::from_utf8_lossy(rest)),
        1 => {
            let mut parts = rest.splitn(3, |b| *b == 0xFF);
            let header = parts.next().unwrap_or_default();
            let payload = parts.next().unwrap_or_default();
            let signature = parts.next().unwrap_or_default();
            verify(
                v,
                &format!("{}.{}.{}", b64(header), b64(payload), b64(signature)),
            );
        }
        2 => {
            let mut parts = rest.splitn(2, |b| *b == 0xFF);
            let header = parts.next().unwrap_or_default();
            let payload = parts.next().unwrap_or_default();
            let signing_input = format!("{}.{}", b64(header), b64(payload));
            let key = EncodingKey::from_secret(SECRET.as_bytes());
            let signature =
                jsonwebtoken::crypto::sign(signing_input.as_bytes(), &key, Algorithm::HS256)
                    .expect("HMAC signing cannot fail");
            verify(v, &format!("{signing_input}.{signature}"));
        }
        _ => {
            let Ok(jwks) = std::str::from_utf8(rest) else {
                return;
            };
            if let Ok(custom) = JwtVerifier::new(None, Some(jwks)) {
                verify(
                    &custom,
                    "eyJhbGciOiJIUzI1NiIsImtpZCI6Im9jdC0xIn0.eyJyb2xlIjoiYSJ9.c2ln",
                );
            }
            let _ = JwtVerifier::new(Some(SECRET), Some(jwks));
        }
    }
});
