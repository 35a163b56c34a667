//! Authentication: verifying the JWTs that clients present (`apikey` / `x-api-key` at the
//! WebSocket upgrade, `access_token` in `phx_join` and in `access_token` pushes).
//!
//! ```text
//! raw token ──percent-decode, drop whitespace──▶ header.payload.signature
//!    header {alg, kid} ──allow-list + decision table──▶ (algorithm, key)   (payload untouched)
//!    jsonwebtoken::decode with Validation = [that one algorithm] ──▶ signature verified
//!    claims: iat numeric? ─▶ exp > now? ─▶ role and exp present? ─▶ Claims
//! ```
//!
//! Decision table (the token header picks a key by `kid`; the algorithm alone decides the
//! key *type*):
//!
//! | header `alg`       | key type required                    | key source                                   |
//! |--------------------|--------------------------------------|----------------------------------------------|
//! | HS256/HS384/HS512  | shared secret                        | JWK `kty:"oct"` with the header `kid`, if any; else `--jwt-secret`; neither → signer error |
//! | RS256/RS384/RS512  | `kty:"RSA"` (2048–4096 bits)          | JWKS by `kid`; no `kid` → signer error       |
//! | ES256              | `kty:"EC"`, `crv:"P-256"`            | JWKS by `kid`; no `kid` → signer error       |
//! | ES384              | `kty:"EC"`, `crv:"P-384"`            | JWKS by `kid`; no `kid` → signer error       |
//! | EdDSA              | `kty:"OKP"`, `crv:"Ed25519"`         | JWKS by `kid`; no `kid` → signer error       |
//! | ES512, Ed25519, Ed448 (alg names), PS*, `none`, anything else | — | refused: signer error (ES512/Ed448 are not supported by the JWT library) |
//!
//! A JWK that carries its own `alg` is bound to it (a token with another `alg` is refused).
//! A JWK with `use` other than `"sig"`, or of a type/curve we cannot verify with, never matches.
//!
//! Invariants:
//! - Signature before claims: nothing in the payload is decoded or looked at before the
//!   signature verified. Only the header is read first, and only to pick the key.
//! - Algorithm bound to key type: a key is found by (`kid`, type the algorithm needs), and
//!   the library is told to accept exactly that one algorithm, and itself refuses a key of
//!   another family. An RSA public key can never be used as an HMAC secret (RS/HS
//!   confusion), an EC key never for RS, and `alg: none` never verifies.
//! - The caller's clock: expiry is judged against the `now_unix` argument, so the
//!   "expired N seconds ago" figure is exact and tests control time.
//! - No secret comparison is done here by hand: HMAC tags are checked by the `hmac` crate's
//!   constant-time `verify`, through `jsonwebtoken`.
//!
//! Error texts are Supabase Realtime's, see [`JwtError`]:
//!
//! | variant            | upgrade 401 `error`                                   | join `reason`                                           |
//! |--------------------|-------------------------------------------------------|---------------------------------------------------------|
//! | `Missing`          | `API key is missing`                                  | `MalformedJWT: The token provided is not a valid JWT`   |
//! | `Malformed`        | `The token provided is not a valid JWT`               | `MalformedJWT: The token provided is not a valid JWT`   |
//! | `Signer`           | `Failed to generate JWT signer, check your JWT secret or JWKS configuration` | `JwtSignerError: <same>`   |
//! | `Signature`        | `Failed to validate JWT signature`                    | `JwtSignatureError: Failed to validate JWT signature`   |
//! | `Expired`          | `Token has expired`                                   | `InvalidJWTToken: Token has expired N seconds ago`      |
//! | `MissingClaims`    | ``Fields `role` and `exp` are required in JWT``       | ``InvalidJWTToken: Fields `role` and `exp` are required in JWT`` |
//!
//! The `system` message is the join reason without its code.

mod jwks;
pub mod jwt;

pub use jwt::{Claims, JwtConfigError, JwtError, JwtVerifier, MAX_TOKEN_LEN};
