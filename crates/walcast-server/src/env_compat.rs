//! Supabase self-hosting variable names, mapped onto walcast's own before the command line
//! is parsed, so an existing realtime service definition works with few changes:
//!
//! | Supabase | walcast |
//! |---|---|
//! | `API_JWT_SECRET` | `JWT_SECRET` |
//! | `API_JWT_JWKS` | `JWT_JWKS` |
//! | `DB_HOST`, `DB_PORT`, `DB_USER`, `DB_PASSWORD`, `DB_NAME`, `DB_SSL` | `DATABASE_URL` |
//! | `PORT` | `PORT` (same name) |
//!
//! walcast's own names win when both are set.

/// Percent-encode a URL component (userinfo or path segment).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `DATABASE_URL` the `DB_*` variables describe, if `DB_HOST` is set.
pub fn database_url_from(get: impl Fn(&str) -> Option<String>) -> Option<String> {
    let host = get("DB_HOST")?;
    let port = get("DB_PORT").unwrap_or_else(|| "5432".into());
    let user = get("DB_USER").unwrap_or_else(|| "postgres".into());
    let name = get("DB_NAME").unwrap_or_else(|| "postgres".into());
    let auth = match get("DB_PASSWORD") {
        Some(p) if !p.is_empty() => format!("{}:{}", encode(&user), encode(&p)),
        _ => encode(&user),
    };
    let ssl = match get("DB_SSL").as_deref() {
        Some("true") | Some("require") => "?sslmode=require",
        _ => "",
    };
    // IPv6 literals need brackets in a URL.
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    };
    Some(format!(
        "postgres://{auth}@{host}:{port}/{}{ssl}",
        encode(&name)
    ))
}

/// Apply the aliases to this process's environment (before clap reads it).
pub fn apply() {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    for (alias, name) in [
        ("API_JWT_SECRET", "JWT_SECRET"),
        ("API_JWT_JWKS", "JWT_JWKS"),
    ] {
        if get(name).is_none() {
            if let Some(v) = get(alias) {
                std::env::set_var(name, v);
            }
        }
    }
    if get("DATABASE_URL").is_none() {
        if let Some(url) = database_url_from(get) {
            std::env::set_var("DATABASE_URL", url);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn db_variables_make_a_url_with_encoded_secrets() {
        let env: HashMap<&str, &str> = [
            ("DB_HOST", "db.internal"),
            ("DB_PORT", "6543"),
            ("DB_USER", "supabase_admin"),
            ("DB_PASSWORD", "p@ss:w/rd"),
            ("DB_NAME", "postgres"),
        ]
        .into();
        let url = database_url_from(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(
            url,
            "postgres://supabase_admin:p%40ss%3Aw%2Frd@db.internal:6543/postgres"
        );
        assert_eq!(database_url_from(|_| None), None);
        let v6: HashMap<&str, &str> = [("DB_HOST", "::1"), ("DB_SSL", "true")].into();
        assert_eq!(
            database_url_from(|k| v6.get(k).map(|v| v.to_string())).unwrap(),
            "postgres://postgres@[::1]:5432/postgres?sslmode=require"
        );
    }
}
