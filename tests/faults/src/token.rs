//! Tokens the subscribers connect with.

use anyhow::Result;

use crate::clock::now_ms;

/// An HS256 token for `role` with `sub`, valid for an hour.
pub fn token(secret: &str, role: &str, sub: &str) -> Result<String> {
    let now = now_ms() / 1000;
    let claims = serde_json::json!({ "role": role, "sub": sub, "iat": now, "exp": now + 3600 });
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}
