//! The configured JSON Web Key Set: parsed and checked once at startup, then looked up by
//! (`kid`, key type) for every asymmetric (and `kid`-carrying HS) token.
//!
//! Invariants:
//! - A key is usable only for the key type it declares (`kty`, and `crv` for EC/OKP). The
//!   lookup asks for a [`KeyNeed`] derived from the token's `alg`; a key of another type with
//!   the same `kid` is simply not a match. That is what makes RS/HS and RS/EC confusion
//!   impossible: the header chooses *which* key by `kid`, never *what kind* of key.
//! - Malformed keys (missing or non-base64url members, wrong coordinate lengths, points not
//!   on the curve, RSA moduli outside 2048..=4096 bits) fail startup with a message naming the
//!   key. Well-formed keys we cannot verify with (P-521, Ed448, X25519, unknown `kty`,
//!   `use: "enc"`) are kept but never match, with a warning, so a provider's JWKS that also
//!   lists such keys still loads.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

use super::jwt::JwtConfigError;

/// The kind of key a token's `alg` can be verified with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyNeed {
    /// HS256/384/512: a shared secret (`kty: "oct"` in a JWKS).
    Hmac,
    /// RS256/384/512: `kty: "RSA"`.
    Rsa,
    /// ES256: `kty: "EC"`, `crv: "P-256"`.
    EcP256,
    /// ES384: `kty: "EC"`, `crv: "P-384"`.
    EcP384,
    /// EdDSA: `kty: "OKP"`, `crv: "Ed25519"`.
    Ed25519,
}

/// One JWK after validation. `usable` is `None` for keys we keep only to say "not supported".
struct JwkEntry {
    kid: Option<String>,
    /// The JWK's own `alg`, if it names one: the key is then bound to exactly that algorithm.
    alg: Option<String>,
    usable: Option<(KeyNeed, DecodingKey)>,
}

/// Why a lookup found nothing usable; becomes the detail of a signer error (for logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LookupMiss {
    /// No key with this `kid` and the key type the algorithm needs.
    NoKey,
    /// The key with this `kid` names a different `alg` than the token.
    AlgMismatch,
}

/// The parsed JWKS.
pub(crate) struct JwkSet {
    keys: Vec<JwkEntry>,
}

impl JwkSet {
    /// Parse and check a JWKS document (`{"keys":[...]}`).
    pub(crate) fn parse(json: &str) -> Result<JwkSet, JwtConfigError> {
        let doc: Value =
            serde_json::from_str(json).map_err(|e| invalid(format!("not valid JSON ({e})")))?;
        let Value::Object(doc) = doc else {
            return Err(invalid(
                "the document must be a JSON object {\"keys\": [...]}",
            ));
        };
        let Some(Value::Array(raw_keys)) = doc.get("keys") else {
            return Err(invalid("the document has no `keys` array"));
        };
        let mut keys = Vec::with_capacity(raw_keys.len());
        for (i, raw) in raw_keys.iter().enumerate() {
            let Value::Object(jwk) = raw else {
                return Err(invalid(format!("keys[{i}] is not a JSON object")));
            };
            let entry = parse_jwk(jwk).map_err(|problem| {
                let kid = jwk.get("kid").and_then(Value::as_str);
                match kid {
                    Some(kid) => invalid(format!("keys[{i}] (kid {kid:?}): {problem}")),
                    None => invalid(format!("keys[{i}]: {problem}")),
                }
            })?;
            if entry.kid.is_none() && entry.usable.is_some() {
                // Tokens select keys by `kid` only, so this key can never be chosen.
                tracing::warn!(index = i, "jwks key has no kid and will never be used");
            }
            if let (Some(kid), Some((need, _))) = (&entry.kid, &entry.usable) {
                let duplicate = keys.iter().any(|k: &JwkEntry| {
                    k.kid.as_deref() == Some(kid.as_str())
                        && k.usable.as_ref().map(|(n, _)| n) == Some(need)
                });
                if duplicate {
                    tracing::warn!(index = i, kid = %kid, "jwks repeats a kid for the same key type; the first one wins");
                }
            }
            keys.push(entry);
        }
        Ok(JwkSet { keys })
    }

    /// Number of keys that can verify something.
    pub(crate) fn usable_len(&self) -> usize {
        self.keys.iter().filter(|k| k.usable.is_some()).count()
    }

    /// The `kid`s of the usable keys, for diagnostics.
    pub(crate) fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys
            .iter()
            .filter(|k| k.usable.is_some())
            .filter_map(|k| k.kid.as_deref())
    }

    /// The first key with this `kid` and of the type `need`; `alg` is the token's algorithm,
    /// checked against the JWK's own `alg` when it has one.
    pub(crate) fn find(
        &self,
        kid: &str,
        need: KeyNeed,
        alg: Algorithm,
    ) -> Result<&DecodingKey, LookupMiss> {
        let entry = self
            .keys
            .iter()
            .find(|k| {
                k.kid.as_deref() == Some(kid) && matches!(&k.usable, Some((n, _)) if *n == need)
            })
            .ok_or(LookupMiss::NoKey)?;
        if let Some(key_alg) = &entry.alg {
            // An `alg` the library cannot parse (e.g. "RSA-OAEP") matches no token algorithm.
            if key_alg.parse::<Algorithm>().ok() != Some(alg) {
                return Err(LookupMiss::AlgMismatch);
            }
        }
        match &entry.usable {
            Some((_, key)) => Ok(key),
            None => Err(LookupMiss::NoKey),
        }
    }
}

fn invalid(reason: impl Into<String>) -> JwtConfigError {
    JwtConfigError::InvalidJwks(reason.into())
}

/// Check one JWK. `Err` is the problem, without the key's position (the caller adds it).
fn parse_jwk(jwk: &Map<String, Value>) -> Result<JwkEntry, String> {
    let kid = match jwk.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err("`kid` is not a string".into()),
    };
    let alg = match jwk.get("alg") {
        None | Some(Value::Null) => None,
        Some(Value::String(alg)) => Some(alg.clone()),
        Some(_) => return Err("`alg` is not a string".into()),
    };
    let kty = match jwk.get("kty") {
        Some(Value::String(kty)) => kty.as_str(),
        Some(_) => return Err("`kty` is not a string".into()),
        None => return Err("`kty` is missing".into()),
    };
    let unusable = |why: &str| -> Result<JwkEntry, String> {
        tracing::warn!(kid = ?kid, kty, reason = why, "jwks key ignored");
        Ok(JwkEntry {
            kid: kid.clone(),
            alg: alg.clone(),
            usable: None,
        })
    };
    if let Some(Value::String(u)) = jwk.get("use") {
        if u != "sig" {
            return unusable("`use` is not \"sig\"");
        }
    }
    let usable = match kty {
        "RSA" => {
            let n = strip_leading_zeros(b64_member(jwk, "n")?);
            let e = strip_leading_zeros(b64_member(jwk, "e")?);
            let bits = bit_len(&n);
            // The verifier refuses moduli above 4096 bits; below 2048 is breakable. Saying so
            // now beats failing every token later.
            if !(2048..=4096).contains(&bits) {
                return Err(format!(
                    "RSA modulus is {bits} bits; only 2048 to 4096 bits are accepted"
                ));
            }
            let e_value = e.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            // Odd and within what the RSA verifier accepts (at most 2^33 - 1).
            if e.len() > 5 || !(3..1 << 33).contains(&e_value) || e_value % 2 == 0 {
                return Err("RSA exponent `e` is not a valid public exponent".into());
            }
            (KeyNeed::Rsa, DecodingKey::from_rsa_raw_components(&n, &e))
        }
        "EC" => {
            let crv = str_member(jwk, "crv")?;
            let (need, len, probe_alg) = match crv {
                "P-256" => (KeyNeed::EcP256, 32, Algorithm::ES256),
                "P-384" => (KeyNeed::EcP384, 48, Algorithm::ES384),
                _ => return unusable("EC curve not supported (only P-256 and P-384)"),
            };
            let x = b64_member(jwk, "x")?;
            let y = b64_member(jwk, "y")?;
            if x.len() != len || y.len() != len {
                return Err(format!(
                    "{crv} coordinates `x` and `y` must be {len} bytes each"
                ));
            }
            let key = DecodingKey::from_ec_components(
                &URL_SAFE_NO_PAD.encode(&x),
                &URL_SAFE_NO_PAD.encode(&y),
            )
            .map_err(|e| format!("EC key not accepted ({e})"))?;
            probe(&key, probe_alg)
                .map_err(|()| format!("({crv}) the point is not on the curve"))?;
            (need, key)
        }
        "OKP" => {
            let crv = str_member(jwk, "crv")?;
            if crv != "Ed25519" {
                return unusable("OKP curve not supported (only Ed25519)");
            }
            let x = b64_member(jwk, "x")?;
            // Checked here because the verifier slices the first 32 bytes without a length
            // check: a short key would panic at verification time.
            if x.len() != 32 {
                return Err("Ed25519 public key `x` must be 32 bytes".into());
            }
            let key = DecodingKey::from_ed_components(&URL_SAFE_NO_PAD.encode(&x))
                .map_err(|e| format!("Ed25519 key not accepted ({e})"))?;
            probe(&key, Algorithm::EdDSA)
                .map_err(|()| "Ed25519 `x` is not a valid public key".to_string())?;
            (KeyNeed::Ed25519, key)
        }
        "oct" => {
            let k = b64_member(jwk, "k")?;
            if k.is_empty() {
                return Err("`k` is empty".into());
            }
            (KeyNeed::Hmac, DecodingKey::from_secret(&k))
        }
        _ => return unusable("unknown `kty`"),
    };
    Ok(JwkEntry {
        kid,
        alg,
        usable: Some(usable),
    })
}

/// Build the verifier once with an empty signature: the key is parsed (and rejected if bad)
/// before any signature is looked at, so `Err` here means the key itself is unusable.
fn probe(key: &DecodingKey, alg: Algorithm) -> Result<(), ()> {
    jsonwebtoken::crypto::verify("", b"probe", key, alg)
        .map(|_| ())
        .map_err(|_| ())
}

fn str_member<'a>(jwk: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    match jwk.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("`{name}` is not a string")),
        None => Err(format!("`{name}` is missing")),
    }
}

fn b64_member(jwk: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    let text = str_member(jwk, name)?;
    // RFC 7518 members are unpadded base64url; tolerate trailing `=` that some tools add.
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| format!("`{name}` is not base64url"))
}

fn strip_leading_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes.drain(..first);
    bytes
}

fn bit_len(be: &[u8]) -> usize {
    match be.first() {
        None => 0,
        Some(top) => (be.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_len_counts_significant_bits() {
        assert_eq!(bit_len(&[]), 0);
        assert_eq!(bit_len(&[1]), 1);
        assert_eq!(bit_len(&[0x80, 0]), 16);
        assert_eq!(bit_len(&strip_leading_zeros(vec![0, 0, 0x7f])), 7);
    }

    #[test]
    fn probe_rejects_a_point_off_the_curve() {
        let x = URL_SAFE_NO_PAD.encode([1u8; 32]);
        let y = URL_SAFE_NO_PAD.encode([2u8; 32]);
        let key = DecodingKey::from_ec_components(&x, &y).expect("valid base64");
        assert!(probe(&key, Algorithm::ES256).is_err());
    }
}
