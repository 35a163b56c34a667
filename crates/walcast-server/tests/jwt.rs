//! JWT verification: algorithms, key selection, confusion attacks, claims rules and the exact
//! Supabase error texts. Tokens are minted here with `jsonwebtoken::encode` (or by hand for
//! the shapes no honest encoder produces); time is the `now` argument, never the clock.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use walcast_server::auth::{Claims, JwtConfigError, JwtError, JwtVerifier};

const NOW: i64 = 1_700_000_000;
const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";
const OCT_KEY: &[u8] = b"an-oct-key-from-the-jwks-that-is-long-enough";

const JWKS: &str = include_str!("fixtures/jwt/jwks.json");
const RSA_PRIVATE: &[u8] = include_bytes!("fixtures/jwt/rsa_private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("fixtures/jwt/rsa_public.pem");
const P256_PRIVATE: &[u8] = include_bytes!("fixtures/jwt/ec_p256_private.pem");
const P384_PRIVATE: &[u8] = include_bytes!("fixtures/jwt/ec_p384_private.pem");
const ED25519_PRIVATE: &[u8] = include_bytes!("fixtures/jwt/ed25519_private.pem");

const NOT_A_JWT: &str = "The token provided is not a valid JWT";
const SIGNER: &str = "Failed to generate JWT signer, check your JWT secret or JWKS configuration";

fn mint(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("test token encodes")
}

fn hs(alg: Algorithm, secret: &[u8], claims: &Value) -> String {
    mint(alg, None, &EncodingKey::from_secret(secret), claims)
}

/// A token assembled from raw JSON segments, for headers no encoder would write.
fn hand_made(header: &str, payload: &str, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

fn good_claims() -> Value {
    json!({"role": "authenticated", "exp": NOW + 3600, "iat": NOW, "sub": "user-42", "aud": "authenticated", "app": {"tier": 2}})
}

fn secret_only() -> JwtVerifier {
    JwtVerifier::new(Some(SECRET), None).expect("secret config is valid")
}

fn jwks_only() -> JwtVerifier {
    JwtVerifier::new(None, Some(JWKS)).expect("fixture JWKS is valid")
}

fn both() -> JwtVerifier {
    JwtVerifier::new(Some(SECRET), Some(JWKS)).expect("secret + fixture JWKS is valid")
}

fn assert_claims_ok(claims: &Claims) {
    assert_eq!(claims.role, "authenticated");
    assert_eq!(claims.exp, NOW + 3600);
    assert_eq!(claims.sub.as_deref(), Some("user-42"));
    assert_eq!(claims.expires_in(NOW), 3600);
    assert_eq!(claims.raw.get("app"), Some(&json!({"tier": 2})));
}

#[test]
fn hs256_hs384_hs512_verify_with_the_secret() {
    let v = secret_only();
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let token = hs(alg, SECRET.as_bytes(), &good_claims());
        let claims = v
            .verify(&token, NOW)
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_claims_ok(&claims);
        let round_trip: Value = serde_json::from_str(&claims.claims_json()).unwrap();
        assert_eq!(round_trip, good_claims());
    }
}

#[test]
fn wrong_secret_is_a_signature_error() {
    let token = hs(
        Algorithm::HS256,
        b"another-secret-that-is-also-long-enough!!",
        &good_claims(),
    );
    let err = secret_only().verify(&token, NOW).unwrap_err();
    assert_eq!(err, JwtError::Signature);
    assert_eq!(err.upgrade_message(), "Failed to validate JWT signature");
    assert_eq!(
        err.join_reason(),
        "JwtSignatureError: Failed to validate JWT signature"
    );
}

#[test]
fn tampered_payload_is_a_signature_error_even_when_it_is_not_json() {
    // Claims are never read before the signature verified: a payload that is not even JSON
    // still gets the signature error, not "not a valid JWT".
    let token = hs(Algorithm::HS256, SECRET.as_bytes(), &good_claims());
    let mut parts: Vec<&str> = token.split('.').collect();
    let forged = URL_SAFE_NO_PAD.encode(r#"{"role":"service_role","exp":9999999999}"#);
    parts[1] = &forged;
    assert_eq!(
        secret_only().verify(&parts.join("."), NOW),
        Err(JwtError::Signature)
    );
    let garbage = URL_SAFE_NO_PAD.encode("not json at all");
    parts[1] = &garbage;
    assert_eq!(
        secret_only().verify(&parts.join("."), NOW),
        Err(JwtError::Signature)
    );
}

#[test]
fn expired_token_reports_seconds_from_the_given_now() {
    let claims = json!({"role": "anon", "exp": NOW - 300});
    let token = hs(Algorithm::HS256, SECRET.as_bytes(), &claims);
    let err = secret_only().verify(&token, NOW).unwrap_err();
    assert_eq!(err, JwtError::Expired { seconds_ago: 300 });
    assert_eq!(err.upgrade_message(), "Token has expired");
    assert_eq!(
        err.join_reason(),
        "InvalidJWTToken: Token has expired 300 seconds ago"
    );
    assert_eq!(err.system_message(), "Token has expired 300 seconds ago");
    // Same token, one second before its exp: valid, with one second left.
    let ok = secret_only().verify(&token, NOW - 301).unwrap();
    assert_eq!(ok.expires_in(NOW - 301), 1);
    // Exactly at exp: expired 0 seconds ago (exp must be strictly in the future).
    assert_eq!(
        secret_only().verify(&token, NOW - 300),
        Err(JwtError::Expired { seconds_ago: 0 })
    );
}

#[test]
fn missing_role_or_exp_is_invalid_jwt_token() {
    let v = secret_only();
    let no_role = hs(
        Algorithm::HS256,
        SECRET.as_bytes(),
        &json!({"exp": NOW + 60}),
    );
    let no_exp = hs(
        Algorithm::HS256,
        SECRET.as_bytes(),
        &json!({"role": "anon"}),
    );
    let null_role = hs(
        Algorithm::HS256,
        SECRET.as_bytes(),
        &json!({"role": null, "exp": NOW + 60}),
    );
    for token in [no_role, no_exp, null_role] {
        let err = v.verify(&token, NOW).unwrap_err();
        assert!(matches!(err, JwtError::MissingClaims(_)), "{err:?}");
        assert_eq!(
            err.upgrade_message(),
            "Fields `role` and `exp` are required in JWT"
        );
        assert_eq!(
            err.join_reason(),
            "InvalidJWTToken: Fields `role` and `exp` are required in JWT"
        );
        assert_eq!(
            err.system_message(),
            "Fields `role` and `exp` are required in JWT"
        );
    }
}

#[test]
fn non_numeric_iat_or_exp_and_non_string_role_are_refused() {
    let v = secret_only();
    for claims in [
        json!({"role": "anon", "exp": NOW + 60, "iat": "yesterday"}),
        json!({"role": "anon", "exp": NOW + 60, "iat": null}),
        json!({"role": "anon", "exp": "tomorrow"}),
        json!({"role": ["anon"], "exp": NOW + 60}),
        json!({"role": "", "exp": NOW + 60}),
    ] {
        let token = hs(Algorithm::HS256, SECRET.as_bytes(), &claims);
        let err = v.verify(&token, NOW).unwrap_err();
        assert!(matches!(err, JwtError::Malformed(_)), "{claims}: {err:?}");
        assert_eq!(err.join_reason(), format!("MalformedJWT: {NOT_A_JWT}"));
    }
}

#[test]
fn decimal_exp_and_iat_are_rounded() {
    let claims = json!({"role": "anon", "exp": (NOW + 100) as f64 + 0.6, "iat": NOW as f64 - 0.4});
    let token = hs(Algorithm::HS256, SECRET.as_bytes(), &claims);
    let got = secret_only().verify(&token, NOW).unwrap();
    assert_eq!(got.exp, NOW + 101);
    // Postgres sees integers, as Supabase passes them.
    assert_eq!(got.raw.get("exp"), Some(&json!(NOW + 101)));
    assert_eq!(got.raw.get("iat"), Some(&json!(NOW)));
    assert_eq!(got.sub, None);
}

#[test]
fn alg_none_is_refused() {
    let payload = json!({"role": "service_role", "exp": NOW + 60}).to_string();
    for header in [
        r#"{"alg":"none"}"#,
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"alg":"none","kid":"oct-1"}"#,
        r#"{"alg":"None"}"#,
        r#"{"typ":"JWT"}"#,
    ] {
        let unsigned = hand_made(header, &payload, b"");
        assert!(unsigned.ends_with('.'), "an empty signature segment");
        for v in [secret_only(), jwks_only(), both()] {
            let err = v.verify(&unsigned, NOW).unwrap_err();
            assert!(matches!(err, JwtError::Signer(_)), "{header}: {err:?}");
            assert_eq!(err.upgrade_message(), SIGNER);
            assert_eq!(err.join_reason(), format!("JwtSignerError: {SIGNER}"));
        }
    }
}

#[test]
fn rsa_ec_and_eddsa_verify_through_the_jwks() {
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
    let p256 = EncodingKey::from_ec_pem(P256_PRIVATE).unwrap();
    let p384 = EncodingKey::from_ec_pem(P384_PRIVATE).unwrap();
    let ed = EncodingKey::from_ed_pem(ED25519_PRIVATE).unwrap();
    let cases = [
        (Algorithm::RS256, "rsa-1", &rsa),
        (Algorithm::RS384, "rsa-1", &rsa),
        (Algorithm::RS512, "rsa-1", &rsa),
        (Algorithm::ES256, "ec-256", &p256),
        (Algorithm::ES384, "ec-384", &p384),
        (Algorithm::EdDSA, "ed-1", &ed),
    ];
    for v in [jwks_only(), both()] {
        for (alg, kid, key) in cases {
            let token = mint(alg, Some(kid), key, &good_claims());
            let claims = v
                .verify(&token, NOW)
                .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_claims_ok(&claims);
        }
    }
    // And an asymmetric token needs a JWKS: the secret alone has no key for it.
    let token = mint(Algorithm::RS256, Some("rsa-1"), &rsa, &good_claims());
    assert!(matches!(
        secret_only().verify(&token, NOW),
        Err(JwtError::Signer(_))
    ));
}

#[test]
fn kid_pointing_at_a_key_of_another_type_is_refused() {
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
    let p256 = EncodingKey::from_ec_pem(P256_PRIVATE).unwrap();
    let ed = EncodingKey::from_ed_pem(ED25519_PRIVATE).unwrap();
    let v = both();
    for token in [
        // RS256 signature, kid of the EC key.
        mint(Algorithm::RS256, Some("ec-256"), &rsa, &good_claims()),
        // ES256 signature, kid of the P-384 key (right kty, wrong curve).
        mint(Algorithm::ES256, Some("ec-384"), &p256, &good_claims()),
        // EdDSA signature, kid of the RSA key.
        mint(Algorithm::EdDSA, Some("rsa-1"), &ed, &good_claims()),
        // RS256 with the kid of the oct key.
        mint(Algorithm::RS256, Some("oct-1"), &rsa, &good_claims()),
        // A kid that does not exist.
        mint(Algorithm::RS256, Some("rsa-404"), &rsa, &good_claims()),
    ] {
        let err = v.verify(&token, NOW).unwrap_err();
        assert!(matches!(err, JwtError::Signer(_)), "{err:?}");
    }
}

#[test]
fn hmac_signed_with_the_rsa_public_key_is_refused() {
    // The classic RS/HS confusion: the attacker knows the public key and uses its PEM as an
    // HMAC secret, hoping the verifier feeds the same bytes to HMAC.
    let public_pem = EncodingKey::from_secret(RSA_PUBLIC);
    let claims = json!({"role": "service_role", "exp": NOW + 3600});
    let with_kid = mint(Algorithm::HS256, Some("rsa-1"), &public_pem, &claims);
    let without_kid = mint(Algorithm::HS256, None, &public_pem, &claims);
    // With a secret configured, the HS token is checked against that secret: no match.
    assert_eq!(both().verify(&with_kid, NOW), Err(JwtError::Signature));
    assert_eq!(both().verify(&without_kid, NOW), Err(JwtError::Signature));
    // With only a JWKS, there is no HMAC key at all (the RSA JWK is never one).
    assert!(matches!(
        jwks_only().verify(&with_kid, NOW),
        Err(JwtError::Signer(_))
    ));
    assert!(matches!(
        jwks_only().verify(&without_kid, NOW),
        Err(JwtError::Signer(_))
    ));
    // The same with the raw modulus bytes of the RSA JWK as the HMAC key.
    let jwks: Value = serde_json::from_str(JWKS).unwrap();
    let n = URL_SAFE_NO_PAD
        .decode(jwks["keys"][0]["n"].as_str().unwrap())
        .unwrap();
    let token = mint(
        Algorithm::HS256,
        Some("rsa-1"),
        &EncodingKey::from_secret(&n),
        &claims,
    );
    assert!(both().verify(&token, NOW).is_err());
    assert!(jwks_only().verify(&token, NOW).is_err());
}

#[test]
fn asymmetric_token_without_kid_is_a_signer_error() {
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
    let p256 = EncodingKey::from_ec_pem(P256_PRIVATE).unwrap();
    for token in [
        mint(Algorithm::RS256, None, &rsa, &good_claims()),
        mint(Algorithm::ES256, None, &p256, &good_claims()),
    ] {
        let err = both().verify(&token, NOW).unwrap_err();
        assert!(matches!(err, JwtError::Signer(_)), "{err:?}");
        assert_eq!(err.join_reason(), format!("JwtSignerError: {SIGNER}"));
        assert_eq!(err.system_message(), SIGNER);
    }
}

#[test]
fn hs_token_with_kid_uses_the_matching_oct_jwk_first() {
    let v = both();
    let oct = EncodingKey::from_secret(OCT_KEY);
    let token = mint(Algorithm::HS256, Some("oct-1"), &oct, &good_claims());
    assert_claims_ok(&v.verify(&token, NOW).unwrap());
    // With that kid the secret is not tried: a token signed with the secret fails.
    let by_secret = mint(
        Algorithm::HS256,
        Some("oct-1"),
        &EncodingKey::from_secret(SECRET.as_bytes()),
        &good_claims(),
    );
    assert_eq!(v.verify(&by_secret, NOW), Err(JwtError::Signature));
    // An unknown kid (what Supabase Auth sends with HS tokens) falls back to the secret.
    let unknown_kid = mint(
        Algorithm::HS512,
        Some("not-in-jwks"),
        &EncodingKey::from_secret(SECRET.as_bytes()),
        &good_claims(),
    );
    assert_claims_ok(&v.verify(&unknown_kid, NOW).unwrap());
    // The oct key also works without any secret configured.
    assert_claims_ok(&jwks_only().verify(&token, NOW).unwrap());
}

#[test]
fn garbage_empty_and_misshapen_tokens_are_not_valid_jwts() {
    let v = both();
    let good = hs(Algorithm::HS256, SECRET.as_bytes(), &good_claims());
    let two_segments = good.rsplit_once('.').unwrap().0.to_string();
    let four_segments = format!("{good}.AAAA");
    let bad_header = format!("!!!{good}");
    let header_not_object = hand_made("[1,2]", "{}", b"sig");
    let header_not_json = hand_made("alg=HS256", "{}", b"sig");
    let bad_signature_encoding = format!("{good}$$");
    for token in [
        "",
        "   ",
        "garbage",
        "a.b",
        "..",
        two_segments.as_str(),
        four_segments.as_str(),
        bad_header.as_str(),
        header_not_object.as_str(),
        header_not_json.as_str(),
        bad_signature_encoding.as_str(),
        "eyJhbGciOiJIUzI1NiJ9.%ZZ.x",
    ] {
        let err = v.verify(token, NOW).unwrap_err();
        assert!(matches!(err, JwtError::Malformed(_)), "{token:?}: {err:?}");
        assert_eq!(err.upgrade_message(), NOT_A_JWT);
        assert_eq!(err.join_reason(), format!("MalformedJWT: {NOT_A_JWT}"));
        assert_eq!(err.system_message(), NOT_A_JWT);
    }
}

#[test]
fn payload_that_is_not_an_object_is_not_a_valid_jwt() {
    // Signed correctly, so the signature check passes and the claims shape is what fails.
    let token = hs(
        Algorithm::HS256,
        SECRET.as_bytes(),
        &json!(["role", "anon"]),
    );
    assert!(matches!(
        secret_only().verify(&token, NOW),
        Err(JwtError::Malformed(_))
    ));
}

#[test]
fn url_encoded_token_with_surrounding_whitespace_is_accepted() {
    let token = hs(Algorithm::HS256, SECRET.as_bytes(), &good_claims());
    let encoded: String = token
        .chars()
        .map(|c| match c {
            '.' => "%2E".to_string(),
            'e' => "%65".to_string(),
            '-' => "%2d".to_string(),
            c => c.to_string(),
        })
        .collect();
    assert_ne!(encoded, token);
    let mid = encoded.len() / 2;
    let messy = format!(" \t{}\n {}\r\n", &encoded[..mid], &encoded[mid..]);
    assert_claims_ok(&secret_only().verify(&messy, NOW).unwrap());
}

#[test]
fn oversized_token_is_refused_before_any_work() {
    let huge = "A".repeat(walcast_server::auth::MAX_TOKEN_LEN + 1);
    assert!(matches!(
        both().verify(&huge, NOW),
        Err(JwtError::Malformed(_))
    ));
}

#[test]
fn jwk_alg_member_binds_the_key_to_that_algorithm() {
    let mut jwks: Value = serde_json::from_str(JWKS).unwrap();
    jwks["keys"][0]["alg"] = json!("RS256");
    let v = JwtVerifier::new(None, Some(&jwks.to_string())).unwrap();
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
    let rs256 = mint(Algorithm::RS256, Some("rsa-1"), &rsa, &good_claims());
    let rs512 = mint(Algorithm::RS512, Some("rsa-1"), &rsa, &good_claims());
    assert_claims_ok(&v.verify(&rs256, NOW).unwrap());
    assert!(matches!(v.verify(&rs512, NOW), Err(JwtError::Signer(_))));
}

#[test]
fn error_texts_match_supabase_exactly() {
    let table: [(JwtError, &str, &str, &str); 6] = [
        (
            JwtError::Missing,
            "API key is missing",
            "MalformedJWT: The token provided is not a valid JWT",
            "The token provided is not a valid JWT",
        ),
        (
            JwtError::Malformed("x"),
            "The token provided is not a valid JWT",
            "MalformedJWT: The token provided is not a valid JWT",
            "The token provided is not a valid JWT",
        ),
        (
            JwtError::Signer("x"),
            "Failed to generate JWT signer, check your JWT secret or JWKS configuration",
            "JwtSignerError: Failed to generate JWT signer, check your JWT secret or JWKS configuration",
            "Failed to generate JWT signer, check your JWT secret or JWKS configuration",
        ),
        (
            JwtError::Signature,
            "Failed to validate JWT signature",
            "JwtSignatureError: Failed to validate JWT signature",
            "Failed to validate JWT signature",
        ),
        (
            JwtError::Expired { seconds_ago: 42 },
            "Token has expired",
            "InvalidJWTToken: Token has expired 42 seconds ago",
            "Token has expired 42 seconds ago",
        ),
        (
            JwtError::MissingClaims("role"),
            "Fields `role` and `exp` are required in JWT",
            "InvalidJWTToken: Fields `role` and `exp` are required in JWT",
            "Fields `role` and `exp` are required in JWT",
        ),
    ];
    for (err, upgrade, join, system) in table {
        assert_eq!(err.upgrade_message(), upgrade, "{err:?}");
        assert_eq!(err.join_reason(), join, "{err:?}");
        assert_eq!(err.system_message(), system, "{err:?}");
    }
}

fn config_err(secret: Option<&str>, jwks: &str) -> JwtConfigError {
    match JwtVerifier::new(secret, Some(jwks)) {
        Ok(_) => panic!("expected a config error for {jwks}"),
        Err(e) => e,
    }
}

#[test]
fn configuration_errors_name_the_problem() {
    assert_eq!(
        JwtVerifier::new(None, None).unwrap_err(),
        JwtConfigError::NoKeys
    );
    assert_eq!(
        JwtVerifier::new(Some(""), None).unwrap_err(),
        JwtConfigError::EmptySecret
    );

    let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
    let mut short_n = vec![0xC3u8; 128];
    short_n[127] |= 1;
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "not valid JSON"),
        ("[]".into(), "JSON object"),
        (r#"{"kees":[]}"#.into(), "no `keys` array"),
        (r#"{"keys":[42]}"#.into(), "keys[0] is not a JSON object"),
        (
            r#"{"keys":[{"kid":"a"}]}"#.into(),
            r#"keys[0] (kid "a"): `kty` is missing"#,
        ),
        (
            r#"{"keys":[{"kty":"RSA","kid":"r","e":"AQAB"}]}"#.into(),
            "`n` is missing",
        ),
        (
            format!(
                r#"{{"keys":[{{"kty":"RSA","kid":"r","n":"{}","e":"AQAB"}}]}}"#,
                b64(&short_n)
            ),
            "RSA modulus is 1024 bits",
        ),
        (
            r#"{"keys":[{"kty":"RSA","n":"***","e":"AQAB"}]}"#.into(),
            "`n` is not base64url",
        ),
        (
            format!(
                r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"e","x":"{}"}}]}}"#,
                b64(&[9; 16])
            ),
            "must be 32 bytes",
        ),
        (
            format!(
                r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"c","x":"{}","y":"{}"}}]}}"#,
                b64(&[1; 31]),
                b64(&[2; 32])
            ),
            "must be 32 bytes each",
        ),
        (
            format!(
                r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"c","x":"{}","y":"{}"}}]}}"#,
                b64(&[1; 32]),
                b64(&[2; 32])
            ),
            "not on the curve",
        ),
        (
            r#"{"keys":[{"kty":"oct","kid":"o"}]}"#.into(),
            "`k` is missing",
        ),
    ];
    for (jwks, expected) in cases {
        match config_err(Some(SECRET), &jwks) {
            JwtConfigError::InvalidJwks(msg) => {
                assert!(
                    msg.contains(expected),
                    "{jwks}: got {msg:?}, wanted {expected:?}"
                )
            }
            other => panic!("{jwks}: {other:?}"),
        }
    }

    // Nothing usable and no secret: refused. With a secret, an empty JWKS is fine.
    assert_eq!(
        config_err(None, r#"{"keys":[]}"#),
        JwtConfigError::NothingUsable
    );
    assert!(JwtVerifier::new(Some(SECRET), Some(r#"{"keys":[]}"#)).is_ok());
}

#[test]
fn well_formed_but_unsupported_keys_load_and_never_match() {
    let mut jwks: Value = serde_json::from_str(JWKS).unwrap();
    let keys = jwks["keys"].as_array_mut().unwrap();
    keys.push(json!({"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"}));
    keys.push(json!({"kty": "OKP", "crv": "Ed448", "kid": "ed448", "x": "AA"}));
    keys.push(json!({"kty": "RSA", "kid": "enc", "use": "enc", "n": "AA", "e": "AQAB"}));
    keys.push(json!({"kty": "weird", "kid": "w"}));
    let v = JwtVerifier::new(None, Some(&jwks.to_string())).unwrap();
    let p256 = EncodingKey::from_ec_pem(P256_PRIVATE).unwrap();
    assert!(v
        .verify(
            &mint(Algorithm::ES256, Some("ec-256"), &p256, &good_claims()),
            NOW
        )
        .is_ok());
    let es512 = hand_made(
        r#"{"alg":"ES512","kid":"p521"}"#,
        &good_claims().to_string(),
        b"sig",
    );
    assert!(matches!(v.verify(&es512, NOW), Err(JwtError::Signer(_))));
    // Only unsupported keys and no secret: nothing could verify.
    let only_unsupported = r#"{"keys":[{"kty":"OKP","crv":"X25519","kid":"x","x":"AA"}]}"#;
    assert_eq!(
        config_err(None, only_unsupported),
        JwtConfigError::NothingUsable
    );
}

#[test]
fn verifier_is_shareable_and_its_debug_output_holds_no_key_material() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<JwtVerifier>();
    let text = format!("{:?}", both());
    assert!(!text.contains(SECRET), "{text}");
    assert!(
        text.contains("rsa-1") && text.contains("<configured>"),
        "{text}"
    );
}
