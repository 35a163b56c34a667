//! Which token roles clients may act as.
//!
//! A token's `role` becomes the Postgres role every check runs under (`SET LOCAL ROLE`). Only
//! the holder of the JWT secret can mint tokens, but one leaked server-side token must not
//! become a superuser session: tokens whose role is a superuser, has `REPLICATION`, or is a
//! predefined `pg_*` role are refused unless the operator lists the role in
//! `--allowed-token-roles`. `BYPASSRLS` roles (Supabase's `service_role`) are the documented
//! way to read past row-level security and stay allowed.
//!
//! Role attributes are cached for [`ROLE_TTL`]: `ALTER ROLE … SUPERUSER` takes effect within
//! that time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::db::sql::SqlPool;

/// Longest role attributes are reused before they are read again.
pub const ROLE_TTL: Duration = Duration::from_secs(10);
/// Most roles cached; past it the cache starts over (roles come from verified tokens, so
/// this only bounds what a misconfigured issuer could cost).
const MAX_CACHED: usize = 10_000;

/// What makes a role privileged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    Superuser,
    Replication,
    Predefined,
}

impl Privilege {
    pub fn as_str(self) -> &'static str {
        match self {
            Privilege::Superuser => "superuser",
            Privilege::Replication => "replication",
            Privilege::Predefined => "predefined role",
        }
    }
}

/// The refusal text for a privileged token role (join error reason, upgrade and REST body).
pub fn refusal_message(role: &str, why: Privilege) -> String {
    format!(
        "PrivilegedTokenRole: role {role:?} ({}) may not be used by clients; allow it with --allowed-token-roles",
        why.as_str()
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RoleInfo {
    exists: bool,
    superuser: bool,
    replication: bool,
}

/// The operator's allow-list and the cached role attributes.
#[derive(Debug, Default)]
pub struct TokenRoles {
    allowed: Vec<String>,
    cache: Mutex<HashMap<String, (RoleInfo, Instant)>>,
}

impl TokenRoles {
    pub fn new(allowed: Vec<String>) -> TokenRoles {
        TokenRoles {
            allowed,
            cache: Mutex::default(),
        }
    }

    fn allowed(&self, role: &str) -> bool {
        self.allowed.iter().any(|a| a == role)
    }

    /// Privilege known without the database: predefined roles by name.
    pub fn by_name(&self, role: &str) -> Option<Privilege> {
        (!self.allowed(role) && role.starts_with("pg_")).then_some(Privilege::Predefined)
    }

    /// Why `role` may not be used by clients, if it may not. `Err` when its attributes could
    /// not be read (the caller decides: a check that needs the database fails anyway).
    pub async fn privilege(&self, sql: &SqlPool, role: &str) -> anyhow::Result<Option<Privilege>> {
        if self.allowed(role) {
            return Ok(None);
        }
        if let Some(p) = self.by_name(role) {
            return Ok(Some(p));
        }
        let info = match self.cached(role) {
            Some(info) => info,
            None => {
                let info = read_role(sql, role).await?;
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= MAX_CACHED {
                    cache.clear();
                }
                cache.insert(role.to_owned(), (info, Instant::now()));
                info
            }
        };
        Ok(if info.superuser {
            Some(Privilege::Superuser)
        } else if info.replication {
            Some(Privilege::Replication)
        } else {
            None
        })
    }

    /// Cached, without touching the database (the upgrade path uses what it knows).
    pub fn cached_privilege(&self, role: &str) -> Option<Privilege> {
        if self.allowed(role) {
            return None;
        }
        if let Some(p) = self.by_name(role) {
            return Some(p);
        }
        let info = self.cached(role)?;
        if info.superuser {
            Some(Privilege::Superuser)
        } else if info.replication {
            Some(Privilege::Replication)
        } else {
            None
        }
    }

    fn cached(&self, role: &str) -> Option<RoleInfo> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(role)
            .filter(|(_, at)| at.elapsed() < ROLE_TTL)
            .map(|(info, _)| *info)
    }
}

async fn read_role(sql: &SqlPool, role: &str) -> anyhow::Result<RoleInfo> {
    let client = sql.get().await?;
    let row = client
        .query_opt(
            "SELECT rolsuper, rolreplication FROM pg_catalog.pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await?;
    Ok(match row {
        Some(r) => RoleInfo {
            exists: true,
            superuser: r.try_get(0)?,
            replication: r.try_get(1)?,
        },
        None => RoleInfo {
            exists: false,
            superuser: false,
            replication: false,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predefined_roles_are_refused_by_name_unless_allowed() {
        let roles = TokenRoles::new(vec!["pg_monitor".into()]);
        assert_eq!(
            roles.by_name("pg_read_all_data"),
            Some(Privilege::Predefined)
        );
        assert_eq!(roles.by_name("pg_monitor"), None);
        assert_eq!(roles.by_name("authenticated"), None);
        assert_eq!(
            roles.cached_privilege("pg_write_all_data"),
            Some(Privilege::Predefined)
        );
    }

    #[test]
    fn the_message_names_role_and_reason() {
        assert_eq!(
            refusal_message("postgres", Privilege::Superuser),
            "PrivilegedTokenRole: role \"postgres\" (superuser) may not be used by clients; allow it with --allowed-token-roles"
        );
    }
}
