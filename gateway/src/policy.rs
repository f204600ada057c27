//! Policy: which workload identity may use which database route, as which database user,
//! on which database name. Deny by default; a matching deny role wins over any allow.
//!
//! The identity is the verified SPIFFE ID only. What the client asks for in its startup
//! packet (`user`, `database`) is a request that the policy accepts, refuses or overrides.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::config::{CreateDbUserMode, DatabaseConfig, DatabaseSelector, Effect, RoleConfig};
use crate::pg::{ErrorResponse, sqlstate};
use crate::pki::SpiffeId;

pub mod startup;

/// Variables a template may use: `{{ .namespace }}`, `{{ .service_account }}`,
/// `{{ .trust_domain }}`.
const TEMPLATE_VARS: [&str; 3] = ["namespace", "service_account", "trust_domain"];

/// Which database routes a role covers is policy, though the proxy's config checks it too
/// (an allow role over a postgres route must name users and database names).
impl DatabaseSelector {
    /// Whether the selector picks `db`: all given names/labels must match, and an empty
    /// selector picks nothing (deny by default).
    pub fn covers(&self, db: &DatabaseConfig) -> bool {
        (self.names.is_empty() || self.names.iter().any(|n| n == &db.name))
            && self.labels.iter().all(|(k, v)| db.labels.get(k) == Some(v))
            && !(self.names.is_empty() && self.labels.is_empty())
    }
}

#[derive(Debug)]
pub struct Policy {
    roles: Vec<Role>,
    databases: HashMap<String, Arc<DatabaseConfig>>,
}

#[derive(Debug)]
struct Role {
    cfg: RoleConfig,
    db_names: Vec<Template>,
    db_users: Vec<Template>,
    db_roles: Vec<Template>,
}

/// Database users a template or `*` never yields: the cluster's superusers and
/// administrative roles on PostgreSQL and Amazon RDS, and PostgreSQL's predefined `pg_*`
/// roles. Why: `db_users: ["{{ .service_account }}"]` would otherwise give a service
/// account named `postgres` the superuser. A role that lists one of them literally still
/// gets it (an operator wrote that name on purpose).
pub const RESERVED_USERS: &[&str] = &[
    "postgres",
    "rdsadmin",
    "rds_superuser",
    "rdsrepladmin",
    "rds_replication",
    "rds_iam",
];

/// Whether `user` is reserved (see [`RESERVED_USERS`]); PostgreSQL folds nothing here, the
/// name is compared as the server will see it.
pub fn is_reserved_user(user: &str) -> bool {
    RESERVED_USERS.contains(&user) || user.starts_with("pg_")
}

/// A string with `{{ .var }}` holes, checked at load so a typo fails then, not per login.
#[derive(Debug, Clone)]
struct Template(Vec<Piece>);

#[derive(Debug, Clone)]
enum Piece {
    Text(String),
    Var(&'static str),
}

impl Template {
    fn parse(s: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = s;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                pieces.push(Piece::Text(rest[..start].to_owned()));
            }
            let end = rest[start..]
                .find("}}")
                .ok_or_else(|| format!("template {s:?}: unclosed {{{{"))?;
            let inner = rest[start + 2..start + end].trim();
            let var = inner
                .strip_prefix('.')
                .and_then(|v| TEMPLATE_VARS.iter().find(|k| **k == v))
                .ok_or_else(|| {
                    format!(
                        "template {s:?}: unknown variable {inner:?} (known: .namespace, .service_account, .trust_domain)"
                    )
                })?;
            pieces.push(Piece::Var(var));
            rest = &rest[start + end + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        Ok(Self(pieces))
    }

    /// The text of a template without holes.
    fn literal(&self) -> Option<&str> {
        match self.0.as_slice() {
            [Piece::Text(t)] => Some(t),
            _ => None,
        }
    }

    fn render(&self, id: &SpiffeId) -> String {
        self.0
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.as_str(),
                Piece::Var("namespace") => id.namespace.as_str(),
                Piece::Var("service_account") => id.service_account.as_str(),
                Piece::Var(_) => id.trust_domain.as_str(),
            })
            .collect()
    }
}

/// `*` matches any run of characters; everything else literally.
fn glob_match(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// What the proxy will do for an allowed session.
#[derive(Debug, Clone)]
pub struct Decision {
    pub database: Arc<DatabaseConfig>,
    pub db_user: String,
    pub db_name: String,
    pub role: String,
    /// Set when a role that gives this user has `create_db_user_mode` other than `off`.
    pub auto_user: Option<AutoUser>,
}

/// An automatic database user: how to retire it and the roles it is to hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoUser {
    pub mode: CreateDbUserMode,
    /// The rendered `db_roles` of the roles that give the user, sorted, without duplicates;
    /// a template never yields a reserved role (see [`RESERVED_USERS`]).
    pub db_roles: Vec<String>,
}

impl Role {
    fn matches(&self, id: &SpiffeId, db: &DatabaseConfig) -> bool {
        let m = &self.cfg.matcher;
        let id_ok = m
            .namespace
            .as_ref()
            .is_none_or(|ns| glob_match(ns, &id.namespace))
            && m.service_account
                .as_ref()
                .is_none_or(|sa| glob_match(sa, &id.service_account))
            && m.spiffe_id
                .as_ref()
                .is_none_or(|g| glob_match(g, &id.to_string()));
        id_ok && self.cfg.databases.covers(db)
    }
}

impl Policy {
    pub fn compile(roles: &[RoleConfig], databases: &[DatabaseConfig]) -> Result<Self, String> {
        let roles = roles
            .iter()
            .map(|r| {
                let parse_all = |v: &[String]| {
                    v.iter()
                        .map(|s| Template::parse(s))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| format!("role {}: {e}", r.name))
                };
                Ok(Role {
                    db_names: parse_all(&r.db_names)?,
                    db_users: parse_all(&r.db_users)?,
                    db_roles: parse_all(&r.db_roles)?,
                    cfg: r.clone(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let databases = databases
            .iter()
            .map(|d| (d.name.clone(), Arc::new(d.clone())))
            .collect();
        Ok(Self { roles, databases })
    }

    pub fn database(&self, route: &str) -> Option<&Arc<DatabaseConfig>> {
        self.databases.get(route)
    }

    /// Decides a connection on a `tcp` route: identity and route only. Returns the
    /// route's settings and the name of the allowing role.
    pub fn decide_tcp(
        &self,
        id: &SpiffeId,
        route: &str,
    ) -> Result<(Arc<DatabaseConfig>, String), ErrorResponse> {
        let (db, allow) = self.authorize(id, route)?;
        Ok((db.clone(), allow[0].cfg.name.clone()))
    }

    /// Deny wins, then at least one allow role must match. Returns the route and the
    /// matching allow roles (never empty).
    fn authorize(
        &self,
        id: &SpiffeId,
        route: &str,
    ) -> Result<(&Arc<DatabaseConfig>, Vec<&Role>), ErrorResponse> {
        let db = self.databases.get(route).ok_or_else(|| {
            ErrorResponse::fatal(
                sqlstate::INVALID_CATALOG_NAME,
                format!("db-gateway: database route \"{route}\" is not configured on the proxy"),
            )
            .with_hint("The node routed this connection to a database the proxy does not know; check the node's route and the proxy's databases list.")
        })?;
        let matching: Vec<&Role> = self.roles.iter().filter(|r| r.matches(id, db)).collect();
        if let Some(deny) = matching.iter().find(|r| r.cfg.effect == Effect::Deny) {
            return Err(ErrorResponse::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!(
                    "db-gateway: identity {id} is denied access to database \"{route}\" by role \"{}\"",
                    deny.cfg.name
                ),
            )
            .with_hint("A deny role in the gateway policy matches this workload; deny wins over allow."));
        }
        let allow: Vec<&Role> = matching
            .into_iter()
            .filter(|r| r.cfg.effect == Effect::Allow)
            .collect();
        if allow.is_empty() {
            let usable = self.usable_routes(id);
            let hint = if usable.is_empty() {
                "No role in the gateway policy matches this workload; ask an operator to add one."
                    .to_owned()
            } else {
                format!("This identity may use: {}.", join_quoted(&usable))
            };
            return Err(ErrorResponse::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("db-gateway: identity {id} is not allowed to use database \"{route}\""),
            )
            .with_hint(hint));
        }
        Ok((db, allow))
    }

    /// Decides a session. `user`/`database` are what the client's startup packet asked.
    pub fn decide(
        &self,
        id: &SpiffeId,
        route: &str,
        user: Option<&str>,
        database: Option<&str>,
    ) -> Result<Decision, ErrorResponse> {
        let (db, allow) = self.authorize(id, route)?;
        let (db_user, users) = choose(&allow, id, user, |r| &r.db_users, |r| r.cfg.force_db_user);
        let db_user = db_user.ok_or_else(|| {
            let msg = match user {
                Some(u) => format!(
                    "db-gateway: identity {id} may not log in to \"{route}\" as database user \"{u}\""
                ),
                None => "db-gateway: no PostgreSQL user name specified in startup packet".to_owned(),
            };
            ErrorResponse::fatal(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, msg)
                .with_hint(format!("Allowed database users: {}.", join_quoted(&users)))
        })?;
        let literal = |r: &&Role| r.db_users.iter().any(|t| t.literal() == Some(&db_user));
        // The route's admin user (automatic users) is reserved too: it creates and alters
        // roles.
        let admin = db.upstream.admin_user.as_deref() == Some(db_user.as_str());
        if (is_reserved_user(&db_user) || admin) && !allow.iter().any(literal) {
            return Err(ErrorResponse::fatal(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                format!(
                    "db-gateway: identity {id} may not log in to \"{route}\" as reserved database user \"{db_user}\""
                ),
            )
            .with_hint(format!(
                "Reserved users ({}, pg_*) come only from a role that lists them literally in db_users, never from a template or \"*\".",
                RESERVED_USERS.join(", ")
            )));
        }
        // An explicit choice of database: libpq sends the user name when the client named
        // no database, so a database equal to the requested user is PostgreSQL's default,
        // which is the user the policy chose.
        let asked = database.filter(|d| !d.is_empty() && Some(*d) != user);
        let requested_db = asked.unwrap_or(&db_user);
        // A forced database fills in the default only: a database the client named is used
        // when allowed and refused otherwise, never silently replaced (a mistyped name must
        // not write into another database).
        let (db_name, names) = choose(
            &allow,
            id,
            Some(requested_db),
            |r| &r.db_names,
            |r| r.cfg.force_db_name && asked.is_none(),
        );
        let db_name = db_name.ok_or_else(|| {
            ErrorResponse::fatal(
                sqlstate::INVALID_CATALOG_NAME,
                format!(
                    "db-gateway: identity {id} may not connect to database name \"{requested_db}\" on \"{route}\""
                ),
            )
            .with_hint(format!("Allowed database names: {}.", join_quoted(&names)))
        })?;
        let auto_user = auto_user(&allow, id, &db_user);
        Ok(Decision {
            database: db.clone(),
            db_user,
            db_name,
            role: allow[0].cfg.name.clone(),
            auto_user,
        })
    }

    fn usable_routes(&self, id: &SpiffeId) -> Vec<String> {
        let mut out: BTreeSet<String> = BTreeSet::new();
        for db in self.databases.values() {
            let roles: Vec<&Role> = self.roles.iter().filter(|r| r.matches(id, db)).collect();
            if roles.iter().any(|r| r.cfg.effect == Effect::Allow)
                && !roles.iter().any(|r| r.cfg.effect == Effect::Deny)
            {
                out.insert(db.name.clone());
            }
        }
        out.into_iter().collect()
    }
}

/// The automatic-user settings for `user`: from the allowing roles that give it (listed,
/// `*`, or forced) and have a mode other than `off`; the first such role's mode.
fn auto_user(roles: &[&Role], id: &SpiffeId, user: &str) -> Option<AutoUser> {
    let gives = |r: &&&Role| {
        r.db_users.iter().any(|t| {
            let v = t.render(id);
            v == user || v == "*"
        })
    };
    let auto: Vec<&&Role> = roles
        .iter()
        .filter(|r| !r.cfg.create_db_user_mode.is_off())
        .filter(gives)
        .collect();
    let mode = auto.first()?.cfg.create_db_user_mode;
    let db_roles: BTreeSet<String> = auto
        .iter()
        .flat_map(|r| r.db_roles.iter())
        .filter_map(|t| {
            let v = t.render(id);
            let reserved = t.literal().is_none() && is_reserved_user(&v);
            (!v.is_empty() && !reserved).then_some(v)
        })
        .collect();
    Some(AutoUser {
        mode,
        db_roles: db_roles.into_iter().collect(),
    })
}

/// Picks the value for one dimension (user or database name): a forcing role decides;
/// otherwise the request must be among the rendered values (`*` allows any).
/// Returns the choice and the allowed values (for the hint).
fn choose(
    roles: &[&Role],
    id: &SpiffeId,
    requested: Option<&str>,
    values: impl Fn(&Role) -> &Vec<Template>,
    forced: impl Fn(&Role) -> bool,
) -> (Option<String>, Vec<String>) {
    if let Some(r) = roles.iter().find(|r| forced(r))
        && let Some(first) = values(r).first()
    {
        let v = first.render(id);
        return (Some(v.clone()), vec![v]);
    }
    let allowed: BTreeSet<String> = roles
        .iter()
        .flat_map(|r| values(r).iter().map(|t| t.render(id)))
        .collect();
    let ok = requested
        .filter(|req| !req.is_empty())
        .filter(|req| allowed.contains(*req) || allowed.contains("*"));
    (ok.map(str::to_owned), allowed.into_iter().collect())
}

fn join_quoted(v: &[String]) -> String {
    v.iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_yaml;

    #[derive(serde::Deserialize)]
    struct P {
        roles: Vec<RoleConfig>,
        databases: Vec<DatabaseConfig>,
    }

    fn policy(yaml: &str) -> Policy {
        let p: P = parse_yaml(std::path::Path::new("t.yaml"), yaml).unwrap();
        Policy::compile(&p.roles, &p.databases).unwrap()
    }

    const BASE: &str = r#"
databases:
  - name: main
    labels: { env: prod }
    upstream: { address: "127.0.0.1:5432", auth: cert, ca: ca.crt }
  - name: other
    upstream: { address: "127.0.0.1:5433", auth: cert, ca: ca.crt }
roles:
  - name: apps
    match: { namespace: "team-*" }
    databases: { labels: { env: prod } }
    db_users: ["{{ .service_account }}", "readonly"]
    db_names: ["{{ .namespace }}", "shared"]
  - name: billing-forced
    match: { spiffe_id: "spiffe://td/ns/billing/sa/*" }
    databases: { names: [main] }
    db_users: ["billing_{{ .service_account }}"]
    db_names: [billing]
    force_db_user: true
    force_db_name: true
  - name: no-intruder
    effect: deny
    match: { service_account: intruder }
    databases: { names: [main, other] }
"#;

    #[test]
    fn selectors_cover_by_name_and_label_and_an_empty_one_covers_nothing() {
        let p: P = parse_yaml(std::path::Path::new("t.yaml"), BASE).unwrap();
        let (main, other) = (&p.databases[0], &p.databases[1]);
        let sel = |yaml: &str| -> DatabaseSelector {
            parse_yaml(std::path::Path::new("s.yaml"), yaml).unwrap()
        };
        let by_label = sel("labels: { env: prod }");
        assert!(by_label.covers(main) && !by_label.covers(other));
        let by_name = sel("names: [other]");
        assert!(!by_name.covers(main) && by_name.covers(other));
        // Names and labels must both match.
        let both = sel("names: [main, other]\nlabels: { env: prod }");
        assert!(both.covers(main) && !both.covers(other));
        let empty = sel("{}");
        assert!(!empty.covers(main) && !empty.covers(other));
    }

    #[test]
    fn templates_render_from_identity() {
        let p = policy(BASE);
        let id = SpiffeId::new("td", "team-a", "api");
        let d = p.decide(&id, "main", Some("api"), Some("team-a")).unwrap();
        assert_eq!((d.db_user.as_str(), d.db_name.as_str()), ("api", "team-a"));
        let d = p
            .decide(&id, "main", Some("readonly"), Some("shared"))
            .unwrap();
        assert_eq!(
            (d.db_user.as_str(), d.db_name.as_str()),
            ("readonly", "shared")
        );
    }

    #[test]
    fn hardening_04_templates_never_yield_reserved_users() {
        let p = policy(BASE);
        // A service account named like the superuser, or a predefined role, gets nothing.
        for sa in ["postgres", "rdsadmin", "rds_superuser", "pg_read_all_data"] {
            let id = SpiffeId::new("td", "team-a", sa);
            let e = p.decide(&id, "main", Some(sa), None).unwrap_err();
            assert_eq!(e.sqlstate, "42501", "{sa}: {e:?}");
            assert!(
                e.message
                    .contains(&format!("reserved database user \"{sa}\"")),
                "{e:?}"
            );
            assert!(
                e.hint.as_deref().unwrap().contains("lists them literally"),
                "{e:?}"
            );
            // The same identity may still use its other, unreserved user.
            let d = p
                .decide(&id, "main", Some("readonly"), Some("shared"))
                .unwrap();
            assert_eq!(d.db_user, "readonly");
        }
        // Forced templates are checked too, and `*` does not cover reserved users.
        let forced =
            policy(&BASE.replace("billing_{{ .service_account }}", "{{ .service_account }}"));
        let id = SpiffeId::new("td", "billing", "postgres");
        let e = forced.decide(&id, "main", None, None).unwrap_err();
        assert_eq!(e.sqlstate, "42501", "{e:?}");
        let any = policy(&BASE.replace("\"readonly\"]", "\"*\"]"));
        let id = SpiffeId::new("td", "team-a", "api");
        assert_eq!(
            any.decide(&id, "main", Some("postgres"), None)
                .unwrap_err()
                .sqlstate,
            "42501"
        );
        assert_eq!(
            any.decide(&id, "main", Some("someone"), Some("shared"))
                .unwrap()
                .db_user,
            "someone"
        );
        // The route's admin user is reserved like the superuser.
        let admin = policy(&BASE.replace(
            "auth: cert, ca: ca.crt }\n  - name: other",
            "auth: cert, ca: ca.crt, admin_user: gateway_admin }\n  - name: other",
        ));
        let id = SpiffeId::new("td", "team-a", "gateway_admin");
        let e = admin
            .decide(&id, "main", Some("gateway_admin"), None)
            .unwrap_err();
        assert_eq!(e.sqlstate, "42501", "{e:?}");
        let id = SpiffeId::new("td", "team-a", "api");
        // Listed literally, it is the operator's choice.
        let literal = policy(&BASE.replace("\"readonly\"]", "\"postgres\"]"));
        let d = literal
            .decide(&id, "main", Some("postgres"), Some("shared"))
            .unwrap();
        assert_eq!(d.db_user, "postgres");
    }

    #[test]
    fn issue_20_a_named_database_is_never_silently_replaced() {
        let p = policy(BASE);
        let id = SpiffeId::new("td", "billing", "worker");
        // No database named (libpq sends the user name): the forced one.
        for db in [None, Some(""), Some("worker")] {
            let d = p.decide(&id, "main", Some("worker"), db).unwrap();
            assert_eq!(d.db_name, "billing", "{db:?}");
        }
        // The forced database named explicitly: fine. Another: 3D000, the allowed in the hint.
        let d = p
            .decide(&id, "main", Some("worker"), Some("billing"))
            .unwrap();
        assert_eq!(d.db_name, "billing");
        let e = p
            .decide(&id, "main", Some("worker"), Some("nosuchdb"))
            .unwrap_err();
        assert_eq!(e.sqlstate, "3D000");
        assert!(e.message.contains("database name \"nosuchdb\""), "{e:?}");
        assert_eq!(
            e.hint.as_deref(),
            Some("Allowed database names: \"billing\".")
        );
        // Unforced roles: the default is the chosen user's name.
        let id = SpiffeId::new("td", "team-a", "api");
        let e = p
            .decide(&id, "main", Some("api"), Some("nosuchdb"))
            .unwrap_err();
        assert_eq!(e.sqlstate, "3D000");
    }

    #[test]
    fn forced_roles_override_the_client_request() {
        let p = policy(BASE);
        let id = SpiffeId::new("td", "billing", "worker");
        let d = p
            .decide(&id, "main", Some("postgres"), Some("postgres"))
            .unwrap();
        assert_eq!(d.db_user, "billing_worker");
        assert_eq!(d.db_name, "billing");
    }

    #[test]
    fn other_user_or_database_is_refused_with_allowed_values() {
        let p = policy(BASE);
        let id = SpiffeId::new("td", "team-a", "api");
        let e = p.decide(&id, "main", Some("postgres"), None).unwrap_err();
        assert_eq!(e.sqlstate, "28000");
        assert!(
            e.message.contains("as database user \"postgres\""),
            "{}",
            e.message
        );
        assert_eq!(
            e.hint.as_deref(),
            Some("Allowed database users: \"api\", \"readonly\".")
        );
        let e = p
            .decide(&id, "main", Some("api"), Some("team-b"))
            .unwrap_err();
        assert_eq!(e.sqlstate, "3D000");
        assert_eq!(
            e.hint.as_deref(),
            Some("Allowed database names: \"shared\", \"team-a\".")
        );
        // Database defaults to the user name, as in PostgreSQL.
        let e = p.decide(&id, "main", Some("api"), None).unwrap_err();
        assert!(e.message.contains("\"api\""), "{}", e.message);
    }

    #[test]
    fn deny_by_default_and_deny_wins() {
        let p = policy(BASE);
        let stranger = SpiffeId::new("td", "default", "web");
        let e = p.decide(&stranger, "main", Some("web"), None).unwrap_err();
        assert_eq!(e.sqlstate, "28000");
        assert!(
            e.message
                .contains("spiffe://td/ns/default/sa/web is not allowed"),
            "{}",
            e.message
        );
        assert!(e.hint.unwrap().contains("No role"));

        let intruder = SpiffeId::new("td", "team-a", "intruder");
        let e = p
            .decide(&intruder, "main", Some("intruder"), Some("team-a"))
            .unwrap_err();
        assert!(e.message.contains("denied access"), "{}", e.message);

        // An identity allowed elsewhere is told where.
        let e = p
            .decide(
                &SpiffeId::new("td", "team-a", "api"),
                "other",
                Some("api"),
                None,
            )
            .unwrap_err();
        assert_eq!(e.hint.as_deref(), Some("This identity may use: \"main\"."));
        let e = p.decide(&stranger, "nowhere", None, None).unwrap_err();
        assert_eq!(e.sqlstate, "3D000");
    }

    #[test]
    fn bad_template_fails_at_load() {
        let yaml = BASE.replace("{{ .namespace }}", "{{ .pod }}");
        let p: P = parse_yaml(std::path::Path::new("t.yaml"), &yaml).unwrap();
        let e = Policy::compile(&p.roles, &p.databases).unwrap_err();
        assert!(e.contains("unknown variable \".pod\""), "{e}");
    }

    #[test]
    fn auto_users_take_mode_and_rendered_roles_from_the_giving_roles() {
        let yaml = BASE.replace(
            "    force_db_name: true\n",
            "    force_db_name: true\n    create_db_user_mode: best_effort_drop\n    db_roles: [\"r_{{ .service_account }}\", \"{{ .service_account }}\", reader, reader]\n",
        );
        let p = policy(&yaml);
        let d = p
            .decide(
                &SpiffeId::new("td", "billing", "worker"),
                "main",
                None,
                None,
            )
            .unwrap();
        let auto = d.auto_user.expect("auto user");
        assert_eq!(auto.mode, CreateDbUserMode::BestEffortDrop);
        assert_eq!(auto.db_roles, ["r_worker", "reader", "worker"]);
        // A template never yields a reserved role.
        let d = p
            .decide(
                &SpiffeId::new("td", "billing", "pg_monitor"),
                "main",
                None,
                None,
            )
            .unwrap();
        assert_eq!(d.auto_user.unwrap().db_roles, ["r_pg_monitor", "reader"]);
        // Roles without a mode give no automatic user.
        let d = p
            .decide(
                &SpiffeId::new("td", "team-a", "api"),
                "main",
                Some("api"),
                Some("team-a"),
            )
            .unwrap();
        assert!(d.auto_user.is_none());
    }

    #[test]
    fn glob() {
        assert!(glob_match("a*c", "abbc"));
        assert!(glob_match("*", ""));
        assert!(glob_match("spiffe://td/ns/*/sa/x", "spiffe://td/ns/n/sa/x"));
        assert!(!glob_match("a*c", "ab"));
        assert!(!glob_match("a*b*c", "acb"));
        assert!(!glob_match("abc", "abcd"));
    }
}
