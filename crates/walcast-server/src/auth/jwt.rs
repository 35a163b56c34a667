//! JWT verification: [`JwtVerifier`] (built once from `--jwt-secret` / `--jwt-jwks`),
//! [`Claims`] (what a verified token grants) and [`JwtError`] (every refusal, with the exact
//! Supabase Realtime texts for the upgrade body, the join reply and `system` messages).
//!
//! See the module docs of [`crate::auth`] for the decision table and the invariants.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::jwks::{JwkSet, KeyNeed, LookupMiss};

/// Longest token accepted, before percent-decoding. Real tokens are a few KB; this only
/// bounds the work an attacker can ask for per verification.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// HS secrets shorter than this get a startup warning (RFC 7518 §3.2 asks for at least the
/// hash size; a short HS256 secret can be brute-forced offline from one token).
const SHORT_SECRET_BYTES: usize = 32;

/// The configuration cannot verify tokens. Startup fails with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtConfigError {
    /// Neither a secret nor a JWKS was given.
    #[error(
        "no JWT key configured: set --jwt-secret (HS256/384/512) and/or --jwt-jwks (RS256/384/512, ES256/384, EdDSA)"
    )]
    NoKeys,
    /// `--jwt-secret ""`: an empty HMAC key would accept tokens anyone can mint.
    #[error("the JWT secret is empty")]
    EmptySecret,
    /// The JWKS document is unusable; the text names the key and the problem.
    #[error("invalid JWKS: {0}")]
    InvalidJwks(String),
    /// A JWKS without a single usable key and no secret: nothing could ever verify.
    #[error("the JWKS has no usable key and no JWT secret is configured")]
    NothingUsable,
}

/// Why a token was refused. `Display` is for logs (it carries a detail); the wire texts come
/// from [`JwtError::upgrade_message`], [`JwtError::join_reason`] and
/// [`JwtError::system_message`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// No token at all (no `apikey` / `x-api-key`). Never produced by
    /// [`JwtVerifier::verify`]; the caller builds it when there is nothing to verify.
    #[error("no token was provided")]
    Missing,
    /// Not a JWT: wrong shape, bad encoding, header or claims that do not parse, claims of
    /// the wrong type (`iat`/`exp` not numbers, `role` not a string).
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// No key can verify this token: unsupported or missing `alg`, no `kid` for an
    /// asymmetric algorithm, no JWK with that `kid` and the key type the `alg` needs, no secret.
    #[error("no key for this token: {0}")]
    Signer(&'static str),
    /// A key was found and the signature does not verify with it.
    #[error("signature does not verify")]
    Signature,
    /// Verified, but `exp` is not in the future.
    #[error("token expired {seconds_ago} seconds ago")]
    Expired {
        /// `now - exp`, never negative.
        seconds_ago: i64,
    },
    /// Verified, but `role` or `exp` is absent (or null).
    #[error("token lacks the `{0}` claim")]
    MissingClaims(&'static str),
}

const MSG_MISSING: &str = "API key is missing";
const MSG_EXPIRED: &str = "Token has expired";
const MSG_CLAIMS: &str = "Fields `role` and `exp` are required in JWT";
const MSG_MALFORMED: &str = "The token provided is not a valid JWT";
const MSG_SIGNATURE: &str = "Failed to validate JWT signature";
const MSG_SIGNER: &str =
    "Failed to generate JWT signer, check your JWT secret or JWKS configuration";

impl JwtError {
    /// The `error` text of the HTTP 401 body `{"error": "<msg>"}` that refuses a WebSocket
    /// upgrade. The upgrade text for an expired token has no "N seconds ago" figure.
    pub fn upgrade_message(&self) -> &'static str {
        match self {
            JwtError::Missing => MSG_MISSING,
            JwtError::Malformed(_) => MSG_MALFORMED,
            JwtError::Signer(_) => MSG_SIGNER,
            JwtError::Signature => MSG_SIGNATURE,
            JwtError::Expired { .. } => MSG_EXPIRED,
            JwtError::MissingClaims(_) => MSG_CLAIMS,
        }
    }

    /// The `reason` of a `phx_join` error reply: `"<Code>: <message>"`.
    pub fn join_reason(&self) -> String {
        let code = match self {
            // A join always has a token (its own or the connection's); if none reached us,
            // "not a valid JWT" is the closest true statement the clients know.
            JwtError::Missing | JwtError::Malformed(_) => "MalformedJWT",
            JwtError::Signer(_) => "JwtSignerError",
            JwtError::Signature => "JwtSignatureError",
            JwtError::Expired { .. } | JwtError::MissingClaims(_) => "InvalidJWTToken",
        };
        format!("{code}: {}", self.system_message())
    }

    /// The `message` of an in-channel `system` error (expiry re-check, `access_token` push).
    pub fn system_message(&self) -> String {
        match self {
            JwtError::Missing => MSG_MALFORMED.to_string(),
            JwtError::Expired { seconds_ago } => {
                format!("Token has expired {seconds_ago} seconds ago")
            }
            other => other.upgrade_message().to_string(),
        }
    }

    /// A short fixed label for metrics and structured logs.
    pub fn label(&self) -> &'static str {
        match self {
            JwtError::Missing => "missing",
            JwtError::Malformed(_) => "malformed",
            JwtError::Signer(_) => "signer",
            JwtError::Signature => "signature",
            JwtError::Expired { .. } => "expired",
            JwtError::MissingClaims(_) => "claims",
        }
    }
}

/// What a verified token grants.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// The Postgres role to act as (`role` claim).
    pub role: String,
    /// Expiry, seconds since the epoch (rounded if the token carried a decimal).
    pub exp: i64,
    /// `sub` when it is a string (used as `request.jwt.claim.sub`).
    pub sub: Option<String>,
    /// The whole claims object, with decimal `exp`/`iat` rounded; passed to Postgres as
    /// `request.jwt.claims`.
    pub raw: Map<String, Value>,
}

impl Claims {
    /// Seconds until expiry (negative once expired).
    pub fn expires_in(&self, now_unix: i64) -> i64 {
        self.exp.saturating_sub(now_unix)
    }

    /// The claims object as compact JSON, for `set_config('request.jwt.claims', …)`.
    pub fn claims_json(&self) -> String {
        serde_json::to_string(&self.raw).expect("a JSON object with string keys always serializes")
    }
}

/// Verifies tokens against the configured secret and JWKS. Built once at startup and shared
/// (`Arc`) by every socket; verification takes `&self` and never blocks.
pub struct JwtVerifier {
    secret: Option<DecodingKey>,
    jwks: Option<JwkSet>,
}

impl std::fmt::Debug for JwtVerifier {
    // Hand-written so that key material can never end up in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.jwks.iter().flat_map(|j| j.kids()).collect();
        f.debug_struct("JwtVerifier")
            .field("secret", &self.secret.as_ref().map(|_| "<configured>"))
            .field("jwks_kids", &kids)
            .finish()
    }
}

/// How a header `alg` is handled.
enum AlgPlan {
    /// HS*: the `oct` JWK named by `kid` if there is one, else the secret.
    Hmac(Algorithm),
    /// Asymmetric: a JWK found by `kid` that has the key type the algorithm needs.
    Jwk(Algorithm, KeyNeed),
}

/// The allow-list. Anything not here, `none` included, has no signer.
fn plan_for(alg: &str) -> Result<AlgPlan, JwtError> {
    Ok(match alg {
        "HS256" => AlgPlan::Hmac(Algorithm::HS256),
        "HS384" => AlgPlan::Hmac(Algorithm::HS384),
        "HS512" => AlgPlan::Hmac(Algorithm::HS512),
        "RS256" => AlgPlan::Jwk(Algorithm::RS256, KeyNeed::Rsa),
        "RS384" => AlgPlan::Jwk(Algorithm::RS384, KeyNeed::Rsa),
        "RS512" => AlgPlan::Jwk(Algorithm::RS512, KeyNeed::Rsa),
        "ES256" => AlgPlan::Jwk(Algorithm::ES256, KeyNeed::EcP256),
        "ES384" => AlgPlan::Jwk(Algorithm::ES384, KeyNeed::EcP384),
        "EdDSA" => AlgPlan::Jwk(Algorithm::EdDSA, KeyNeed::Ed25519),
        "ES512" => return Err(JwtError::Signer("ES512 (P-521) is not supported")),
        // RFC 9864 names; the JWT library only parses the `EdDSA` spelling.
        "Ed25519" | "Ed448" => {
            return Err(JwtError::Signer(
                "alg Ed25519/Ed448 is not supported (Ed25519 keys work with alg EdDSA)",
            ))
        }
        "none" => {
            return Err(JwtError::Signer(
                "unsigned tokens (alg none) are never accepted",
            ))
        }
        _ => return Err(JwtError::Signer("algorithm not accepted")),
    })
}

/// Only the header fields that choose the key.
struct KeyHint {
    alg: String,
    kid: Option<String>,
}

impl JwtVerifier {
    /// Build the verifier. `secret` verifies HS256/384/512; `jwks_json` is a JWKS document
    /// (`{"keys":[...]}`) for RS*, ES256/384, EdDSA and `kid`-named HS keys. At least one is
    /// required.
    pub fn new(
        secret: Option<&str>,
        jwks_json: Option<&str>,
    ) -> Result<JwtVerifier, JwtConfigError> {
        if secret.is_none() && jwks_json.is_none() {
            return Err(JwtConfigError::NoKeys);
        }
        let secret = match secret {
            None => None,
            Some("") => return Err(JwtConfigError::EmptySecret),
            Some(s) => {
                if s.len() < SHORT_SECRET_BYTES {
                    tracing::warn!(
                        bytes = s.len(),
                        "jwt secret is shorter than 32 bytes; tokens signed with it can be brute-forced"
                    );
                }
                // The secret is used as raw bytes, as Supabase and every HS signer do (not
                // base64-decoded).
                Some(DecodingKey::from_secret(s.as_bytes()))
            }
        };
        let jwks = jwks_json.map(JwkSet::parse).transpose()?;
        if secret.is_none() && jwks.as_ref().is_none_or(|j| j.usable_len() == 0) {
            return Err(JwtConfigError::NothingUsable);
        }
        Ok(JwtVerifier { secret, jwks })
    }

    /// Verify `token` (as received: it is percent-decoded and stripped of whitespace first)
    /// at time `now_unix` (seconds since the epoch) and return its claims.
    pub fn verify(&self, token: &str, now_unix: i64) -> Result<Claims, JwtError> {
        let token = clean_token(token)?;
        let hint = read_key_hint(&token)?;
        let (alg, key) = self.select_key(&hint)?;

        // The algorithm list is exactly the one algorithm we chose a key for; the library
        // also refuses a key whose family does not match it. Its own time checks are off:
        // expiry is ours (exact texts, caller's clock), and `aud`/`nbf` are not part of the
        // Supabase contract.
        let mut validation = Validation::new(alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.leeway = 0;
        validation.required_spec_claims.clear();

        let data = jsonwebtoken::decode::<Map<String, Value>>(token.as_bytes(), key, &validation)
            .map_err(|e| map_decode_error(&e))?;
        claims_from_verified(data.claims, now_unix)
    }

    fn select_key(&self, hint: &KeyHint) -> Result<(Algorithm, &DecodingKey), JwtError> {
        match plan_for(&hint.alg)? {
            AlgPlan::Hmac(alg) => {
                if let (Some(kid), Some(jwks)) = (&hint.kid, &self.jwks) {
                    match jwks.find(kid, KeyNeed::Hmac, alg) {
                        Ok(key) => return Ok((alg, key)),
                        Err(LookupMiss::AlgMismatch) => {
                            return Err(JwtError::Signer("the JWK for this kid names another alg"))
                        }
                        // Supabase Auth signs HS tokens with a `kid` but never publishes the
                        // secret as a JWK: fall back to the configured secret.
                        Err(LookupMiss::NoKey) => {}
                    }
                }
                match &self.secret {
                    Some(key) => Ok((alg, key)),
                    None => Err(JwtError::Signer("HS token but no JWT secret is configured")),
                }
            }
            AlgPlan::Jwk(alg, need) => {
                let Some(kid) = &hint.kid else {
                    return Err(JwtError::Signer("asymmetric token without a kid"));
                };
                let Some(jwks) = &self.jwks else {
                    return Err(JwtError::Signer(
                        "asymmetric token but no JWKS is configured",
                    ));
                };
                match jwks.find(kid, need, alg) {
                    Ok(key) => Ok((alg, key)),
                    Err(LookupMiss::NoKey) => Err(JwtError::Signer(
                        "no JWK with this kid and the key type of the alg",
                    )),
                    Err(LookupMiss::AlgMismatch) => {
                        Err(JwtError::Signer("the JWK for this kid names another alg"))
                    }
                }
            }
        }
    }
}

/// Percent-decode, then drop all whitespace (what Supabase does to every token, so tokens
/// pasted into URLs or split across lines still work).
fn clean_token(raw: &str) -> Result<String, JwtError> {
    if raw.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed("token too long"));
    }
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hi = bytes.get(i + 1).and_then(|c| hex_value(*c));
            let lo = bytes.get(i + 2).and_then(|c| hex_value(*c));
            match (hi, lo) {
                (Some(hi), Some(lo)) => {
                    decoded.push(hi << 4 | lo);
                    i += 3;
                }
                _ => return Err(JwtError::Malformed("invalid percent-encoding")),
            }
        } else {
            decoded.push(b);
            i += 1;
        }
    }
    let text = String::from_utf8(decoded)
        .map_err(|_| JwtError::Malformed("percent-decoded token is not UTF-8"))?;
    Ok(text.chars().filter(|c| !c.is_whitespace()).collect())
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Check the compact shape (`header.payload.signature`) and read `alg`/`kid` from the header.
/// The payload is not decoded here: claims are read only after the signature verified.
fn read_key_hint(token: &str) -> Result<KeyHint, JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("not three dot-separated segments"));
    };
    if header.is_empty() || payload.is_empty() {
        return Err(JwtError::Malformed("empty header or payload segment"));
    }
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| JwtError::Malformed("header is not base64url"))?;
    let header: Value =
        serde_json::from_slice(&header).map_err(|_| JwtError::Malformed("header is not JSON"))?;
    let Value::Object(header) = header else {
        return Err(JwtError::Malformed("header is not a JSON object"));
    };
    let Some(Value::String(alg)) = header.get("alg") else {
        // Supabase answers a header without a usable `alg` with the signer error.
        return Err(JwtError::Signer("header has no alg"));
    };
    let kid = match header.get("kid") {
        Some(Value::String(kid)) => Some(kid.clone()),
        _ => None,
    };
    Ok(KeyHint {
        alg: alg.clone(),
        kid,
    })
}

fn map_decode_error(e: &jsonwebtoken::errors::Error) -> JwtError {
    match e.kind() {
        ErrorKind::InvalidSignature => JwtError::Signature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey => JwtError::Signer("the key cannot verify this algorithm"),
        // Base64/JSON/UTF-8 problems in the header, payload or signature segment, or a
        // payload that is not a JSON object.
        _ => JwtError::Malformed("token does not decode"),
    }
}

/// A JSON number as whole seconds: decimals are rounded (half away from zero), values out of
/// range saturate.
fn whole_seconds(n: &serde_json::Number) -> i64 {
    if let Some(i) = n.as_i64() {
        i
    } else if n.as_u64().is_some() {
        i64::MAX
    } else {
        // `as` saturates for out-of-range floats, which is the intent here.
        n.as_f64().map_or(0, |f| f.round() as i64)
    }
}

/// Replace a decimal number by its rounded value, so that Postgres policies that cast
/// `exp`/`iat` to an integer keep working. Returns the value in whole seconds.
fn round_in_place(raw: &mut Map<String, Value>, name: &str) -> Option<Result<i64, ()>> {
    let value = raw.get_mut(name)?;
    match value {
        Value::Null => None,
        Value::Number(n) => {
            let secs = whole_seconds(n);
            if n.is_f64() {
                *value = Value::from(secs);
            }
            Some(Ok(secs))
        }
        _ => Some(Err(())),
    }
}

/// Claims checks, in Supabase's order: `iat` type, then expiry, then presence of `role`/`exp`.
fn claims_from_verified(mut raw: Map<String, Value>, now_unix: i64) -> Result<Claims, JwtError> {
    if let Some(Value::Null) = raw.get("iat") {
        return Err(JwtError::Malformed("`iat` is not a number"));
    }
    if let Some(Err(())) = round_in_place(&mut raw, "iat") {
        return Err(JwtError::Malformed("`iat` is not a number"));
    }
    let exp = match round_in_place(&mut raw, "exp") {
        None => None,
        Some(Ok(exp)) => Some(exp),
        Some(Err(())) => return Err(JwtError::Malformed("`exp` is not a number")),
    };
    if let Some(exp) = exp {
        if exp <= now_unix {
            return Err(JwtError::Expired {
                seconds_ago: now_unix.saturating_sub(exp),
            });
        }
    }
    let role = match raw.get("role") {
        None | Some(Value::Null) => return Err(JwtError::MissingClaims("role")),
        Some(Value::String(role)) if !role.is_empty() => role.clone(),
        Some(_) => return Err(JwtError::Malformed("`role` is not a non-empty string")),
    };
    let Some(exp) = exp else {
        return Err(JwtError::MissingClaims("exp"));
    };
    let sub = raw.get("sub").and_then(Value::as_str).map(str::to_owned);
    Ok(Claims {
        role,
        exp,
        sub,
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_token_decodes_percent_escapes_and_drops_whitespace() {
        assert_eq!(clean_token(" a%2Eb\n.c\t%20").unwrap(), "a.b.c");
        assert_eq!(clean_token("%41%62").unwrap(), "Ab");
        assert_eq!(
            clean_token("a%2"),
            Err(JwtError::Malformed("invalid percent-encoding"))
        );
        assert_eq!(
            clean_token("a%zz"),
            Err(JwtError::Malformed("invalid percent-encoding"))
        );
        assert_eq!(
            clean_token("%ff"),
            Err(JwtError::Malformed("percent-decoded token is not UTF-8"))
        );
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(
            clean_token(&long),
            Err(JwtError::Malformed("token too long"))
        );
    }

    #[test]
    fn whole_seconds_rounds_and_saturates() {
        let n = |v: Value| match v {
            Value::Number(n) => n,
            other => panic!("not a number: {other}"),
        };
        assert_eq!(whole_seconds(&n(serde_json::json!(10))), 10);
        assert_eq!(whole_seconds(&n(serde_json::json!(10.5))), 11);
        assert_eq!(whole_seconds(&n(serde_json::json!(10.4))), 10);
        assert_eq!(whole_seconds(&n(serde_json::json!(-3.5))), -4);
        assert_eq!(whole_seconds(&n(serde_json::json!(u64::MAX))), i64::MAX);
        assert_eq!(whole_seconds(&n(serde_json::json!(1e300))), i64::MAX);
    }

    #[test]
    fn claims_order_matches_supabase() {
        let obj = |v: Value| match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        };
        // Expired beats missing role.
        assert_eq!(
            claims_from_verified(obj(serde_json::json!({"exp": 90})), 100),
            Err(JwtError::Expired { seconds_ago: 10 })
        );
        // A bad iat beats everything else.
        assert_eq!(
            claims_from_verified(obj(serde_json::json!({"exp": 90, "iat": "x"})), 100),
            Err(JwtError::Malformed("`iat` is not a number"))
        );
        assert_eq!(
            claims_from_verified(obj(serde_json::json!({"exp": 190})), 100),
            Err(JwtError::MissingClaims("role"))
        );
        assert_eq!(
            claims_from_verified(obj(serde_json::json!({"role": "anon"})), 100),
            Err(JwtError::MissingClaims("exp"))
        );
        assert_eq!(
            claims_from_verified(obj(serde_json::json!({"role": 7, "exp": 190})), 100),
            Err(JwtError::Malformed("`role` is not a non-empty string"))
        );
        // Expiry is strict: exp == now is expired.
        assert_eq!(
            claims_from_verified(obj(serde_json::json!({"role": "anon", "exp": 100})), 100),
            Err(JwtError::Expired { seconds_ago: 0 })
        );
    }

    #[test]
    fn plan_refuses_everything_off_the_allow_list() {
        for alg in [
            "none", "None", "NONE", "PS256", "ES512", "Ed25519", "HS1", "", "hs256",
        ] {
            assert!(
                matches!(plan_for(alg), Err(JwtError::Signer(_))),
                "{alg} must have no signer"
            );
        }
    }
}
