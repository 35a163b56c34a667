//! Which token roles clients may act as.
//!
//! A token's `role` becomes the Postgres role every check runs under (`SET LOCAL ROLE`). Only
//! the holder of the JWT secret can mint tokens, but one leaked server-side token must not
//! become a superuser session: tokens whose role is a superuser, has `REPLICATION`, or is a
//! predefined `pg_*` role are refused unless the operator lists the role in
//! `--allowed-token-roles`. `BYPASSRLS` roles (Supabase's `service_role`) are the documented
//! way to read past row-level security and stay allowed.
//!
//! Role attributes are cached for [`ROLE_TTL`] (the catalog cache's bound,
//! [`crate::db::catalog_cache::CATALOG_TTL`]): `ALTER ROLE … SUPERUSER` or `DROP ROLE` takes
//! effect within that time. The look-up is single-flight: a reconnect storm of thousands of
//! sockets with the same role reads `pg_roles` once. Past
//! [`crate::db::catalog_cache::MAX_ENTRIES`] roles the cache starts over (roles come from
//! verified tokens, so that only bounds what a misconfigured issuer could cost).

use std::sync::Arc;
use std::time::Duration;

use crate::db::catalog_cache::{SingleFlight, CATALOG_TTL};
use crate::db::sql::SqlPool;

/// Longest role attributes are reused before they are read again.
pub const ROLE_TTL: Duration = CATALOG_TTL;

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
pub struct TokenRoles {
    allowed: Vec<String>,
    cache: SingleFlight<String, RoleInfo>,
}

impl Default for TokenRoles {
    fn default() -> Self {
        TokenRoles::new(Vec::new())
    }
}

impl std::fmt::Debug for TokenRoles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRoles")
            .field("allowed", &self.allowed)
            .finish_non_exhaustive()
    }
}

impl TokenRoles {
    pub fn new(allowed: Vec<String>) -> TokenRoles {
        TokenRoles {
            allowed,
            cache: SingleFlight::new("role", ROLE_TTL),
        }
    }

    /// Whether a role of that name exists (token roles must be real roles), from the same
    /// cached, single-flight read as [`TokenRoles::privilege`].
    pub async fn exists(&self, sql: &Arc<SqlPool>, role: &str) -> anyhow::Result<bool> {
        Ok(self.info(sql, role).await?.exists)
    }

    async fn info(&self, sql: &Arc<SqlPool>, role: &str) -> anyhow::Result<RoleInfo> {
        let sql = sql.clone();
        let name = role.to_string();
        Ok(self
            .cache
            .get(
                &name.clone(),
                |_| true,
                move || async move { read_role(&sql, &name).await },
            )
            .await?)
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
    pub async fn privilege(
        &self,
        sql: &Arc<SqlPool>,
        role: &str,
    ) -> anyhow::Result<Option<Privilege>> {
        if self.allowed(role) {
            return Ok(None);
        }
        if let Some(p) = self.by_name(role) {
            return Ok(Some(p));
        }
        let info = self.info(sql, role).await?;
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
        self.cache.peek(&role.to_string())
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
