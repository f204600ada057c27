//! Automatic database users (issue 19, Teleport's model per policy role): a session whose
//! allowing role has `create_db_user_mode` gets its database user created (or brought in
//! line with the policy) by the route's `upstream.admin_user` before it logs in, and the
//! user is retired when its last session ends (`keep`: roles revoked and `NOLOGIN`;
//! `best_effort_drop`: dropped, or kept when objects depend on it).
//!
//! Only users that are members of the marker role [`MARKER_ROLE`] are ever changed: a user
//! that exists without it belongs to someone else and the session is refused (`28000`).
//! Changes to one user are serialized by an advisory lock on a hash of its name, across
//! proxy processes and replicas: [`ensure`] holds it (session-level) until the session's own
//! login is done, so a concurrent [`release`] (which takes it per transaction) counts that
//! login's backend and does not retire the user under it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Shared;
use crate::audit::{DbUserEvent, SessionInfo};
use crate::config::{CreateDbUserMode, DatabaseConfig, UpstreamAuth};
use crate::pg::{self, ErrorResponse, sqlstate};
use crate::policy::{AutoUser, Decision};
use crate::telemetry::proxy::{DB_USER_CHANGE_ERRORS_TOTAL, DB_USER_CHANGES_TOTAL};
use crate::upstream::{Login, UpstreamError};

/// Every automatic user is a member of this role (created `NOLOGIN` when missing).
pub const MARKER_ROLE: &str = "gateway-auto-user";
/// The database the admin user logs in to (roles are cluster-wide).
pub const ADMIN_DATABASE: &str = "postgres";
/// Granted to automatic users on `auth: rds-iam` routes (IAM login needs it).
const RDS_IAM: &str = "rds_iam";
/// Bounds everything after the admin login (lock waits included).
const PROVISION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`release`] waits for the ended session's backend to leave `pg_stat_activity`.
const BACKEND_EXIT_WAIT: Duration = Duration::from_secs(2);

/// `s` as an SQL identifier: double-quoted, inner quotes doubled (`quote_ident`).
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `s` as an SQL string literal (`standard_conforming_strings` is on since PostgreSQL 9.1,
/// so only quotes need doubling).
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The advisory lock key of one user's changes.
fn lock_key(user: &str) -> String {
    format!(
        "hashtext({})",
        literal(&format!("db-gateway/auto-user/{user}"))
    )
}

type Rows = Vec<Vec<Option<String>>>;

#[derive(Debug)]
enum Failure {
    /// The connection broke or the server spoke out of turn.
    Io(UpstreamError),
    /// The server refused a statement.
    Sql(ErrorResponse),
    Timeout,
}

impl From<UpstreamError> for Failure {
    fn from(e: UpstreamError) -> Self {
        Failure::Io(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Io(UpstreamError::Io(e))
    }
}

/// A logged-in admin session running simple queries.
struct Admin {
    login: Login,
    buf: Vec<u8>,
}

impl Admin {
    async fn connect(shared: &Shared, db: &DatabaseConfig) -> Result<Self, UpstreamError> {
        let admin = db.upstream.admin_user.as_deref().unwrap_or_default();
        let login = tokio::time::timeout(
            shared.cfg.upstream_login_timeout,
            shared.upstreams.login(
                db,
                admin,
                ADMIN_DATABASE,
                &[],
                shared.cfg.upstream_connect_timeout,
            ),
        )
        .await
        .unwrap_or_else(|_| {
            Err(UpstreamError::LoginTimeout {
                address: db.upstream.address.clone(),
                timeout: shared.cfg.upstream_login_timeout,
            })
        })?;
        let buf = login.rest.clone();
        Ok(Self { login, buf })
    }

    /// Runs `sql` (one or more statements, one implicit transaction unless it says
    /// otherwise) and returns the rows of its results.
    async fn query(&mut self, sql: &str) -> Result<Rows, Failure> {
        let mut q = vec![b'Q'];
        q.extend_from_slice(&(4 + sql.len() as i32 + 1).to_be_bytes());
        q.extend_from_slice(sql.as_bytes());
        q.push(0);
        self.login.stream.write_all(&q).await?;
        self.login.stream.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        let mut chunk = [0u8; 4096];
        loop {
            while let Some((tag, body, used)) =
                pg::split_message(&self.buf, pg::MAX_LOGIN_MESSAGE_LENGTH)
                    .map_err(|e| UpstreamError::Protocol(e.message))?
            {
                match tag {
                    b'D' => rows.push(
                        data_row(body)
                            .ok_or_else(|| UpstreamError::Protocol("malformed DataRow".into()))?,
                    ),
                    b'E' => {
                        error = Some(ErrorResponse::parse(body).ok_or_else(|| {
                            UpstreamError::Protocol("malformed ErrorResponse".into())
                        })?)
                    }
                    b'Z' => {
                        self.buf.drain(..used);
                        return match error {
                            Some(e) => Err(Failure::Sql(e)),
                            None => Ok(rows),
                        };
                    }
                    _ => {}
                }
                self.buf.drain(..used);
            }
            let n = self.login.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(
                    UpstreamError::Protocol("server closed the admin session".into()).into(),
                );
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// `Some((can_login, marked))` when the role exists.
    async fn state(&mut self, user: &str) -> Result<Option<(bool, bool)>, Failure> {
        let rows = self
            .query(&format!(
                "SELECT r.rolcanlogin, EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid \
                 WHERE m.member = r.oid AND g.rolname = {}) FROM pg_roles r WHERE r.rolname = {}",
                literal(MARKER_ROLE),
                literal(user)
            ))
            .await?;
        Ok(rows.first().map(|r| {
            let t = |i: usize| r.get(i).and_then(|v| v.as_deref()) == Some("t");
            (t(0), t(1))
        }))
    }

    /// The roles `user` is a direct member of, the marker left out.
    async fn granted(&mut self, user: &str) -> Result<Vec<String>, Failure> {
        let rows = self
            .query(&format!(
                "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid \
                 JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = {} AND g.rolname <> {} ORDER BY 1",
                literal(user),
                literal(MARKER_ROLE)
            ))
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect())
    }

    /// Ends the session politely (the server logs no unexpected EOF).
    async fn close(mut self) {
        let _ = self.login.stream.write_all(&pg::TERMINATE).await;
        let _ = self.login.stream.shutdown().await;
    }
}

fn data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let n = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let mut at = 2;
    let mut out = Vec::new();
    for _ in 0..n {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            out.push(None);
        } else {
            let v = body.get(at..at + len as usize)?;
            out.push(Some(String::from_utf8_lossy(v).into_owned()));
            at += len as usize;
        }
    }
    Some(out)
}

/// The roles `user` is to hold: the policy's, and `rds_iam` on an IAM route.
fn wanted_roles(db: &DatabaseConfig, auto: &AutoUser, user: &str) -> Vec<String> {
    let mut set: BTreeSet<String> = auto.db_roles.iter().cloned().collect();
    if db.upstream.auth == Some(UpstreamAuth::RdsIam) {
        set.insert(RDS_IAM.to_owned());
    }
    set.remove(MARKER_ROLE);
    set.remove(user);
    set.into_iter().collect()
}

/// The admin session of a provisioned user, holding the user's lock until the session's
/// own login is done ([`Held::done`]).
pub(super) struct Held {
    admin: Admin,
    user: String,
}

impl Held {
    pub(super) async fn done(mut self) {
        let _ = self
            .admin
            .query(&format!(
                "SELECT pg_advisory_unlock({})",
                lock_key(&self.user)
            ))
            .await;
        self.admin.close().await;
    }
}

/// What [`run`](super::postgres::run) needs to retire the user after the session.
pub(super) struct AutoEnd {
    pub database: Arc<DatabaseConfig>,
    pub user: String,
    pub mode: CreateDbUserMode,
}

/// One audit record for `user`.
struct Report<'a> {
    shared: &'a Shared,
    info: &'a SessionInfo,
    route: &'a str,
    user: &'a str,
}

impl Report<'_> {
    fn emit(
        &self,
        action: &'static str,
        roles: &[String],
        granted: &[String],
        revoked: &[String],
        error: Option<&ErrorResponse>,
    ) {
        let counter = if error.is_some() {
            DB_USER_CHANGE_ERRORS_TOTAL
        } else {
            DB_USER_CHANGES_TOTAL
        };
        metrics::counter!(counter, "action" => action).increment(1);
        self.shared.audit.db_user(&DbUserEvent {
            action,
            session_id: &self.info.session_id,
            identity: &self.info.identity,
            database_route: self.route,
            db_user: self.user,
            roles,
            granted,
            revoked,
            result: if error.is_some() { "error" } else { "success" },
            error_code: error.map(|e| e.sqlstate.as_str()),
            error_message: error.map(|e| e.message.as_str()),
        });
    }
}

/// What the client gets when provisioning failed.
fn to_client(failure: Failure, route: &str, user: &str, admin: &str) -> ErrorResponse {
    match failure {
        Failure::Sql(e) => {
            let hint = if e.sqlstate == sqlstate::INSUFFICIENT_PRIVILEGE {
                format!(
                    "The admin user \"{admin}\" needs CREATEROLE and the admin option on every role it grants (GRANT <role> TO \"{admin}\" WITH ADMIN OPTION; on Amazon RDS rds_iam too)."
                )
            } else {
                "Check the role's db_roles: each must exist on the database server.".to_owned()
            };
            ErrorResponse::fatal(
                &e.sqlstate,
                format!(
                    "db-gateway: cannot provision database user \"{user}\" on \"{route}\" as \"{admin}\": {}",
                    e.message
                ),
            )
            .with_hint(hint)
        }
        Failure::Io(e) => ErrorResponse::fatal(
            sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
            format!(
                "db-gateway: cannot provision database user \"{user}\" on \"{route}\": the admin session failed: {e}"
            ),
        )
        .with_hint("The proxy log has details."),
        Failure::Timeout => ErrorResponse::fatal(
            sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
            format!(
                "db-gateway: cannot provision database user \"{user}\" on \"{route}\": no answer within {PROVISION_TIMEOUT:?}"
            ),
        )
        .with_hint("Another session may hold the user's lock; check the database server's locks and load."),
    }
}

/// Before the session's login: creates `decision.db_user` or brings its roles and `LOGIN`
/// in line with the policy. `Ok` holds the user's lock until [`Held::done`].
pub(super) async fn ensure(
    shared: &Shared,
    info: &SessionInfo,
    decision: &Decision,
    auto: &AutoUser,
) -> Result<Box<Held>, ErrorResponse> {
    let db = &decision.database;
    let user = decision.db_user.as_str();
    let route = db.name.as_str();
    let admin_user = db.upstream.admin_user.clone().unwrap_or_default();
    let report = Report {
        shared,
        info,
        route,
        user,
    };
    let mut admin = match Admin::connect(shared, db).await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(session = %info.session_id, %route, admin = %admin_user, %user, e = %e, "admin login for automatic user failed");
            let error = ErrorResponse::fatal(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                format!(
                    "db-gateway: cannot provision database user \"{user}\" on \"{route}\": login as admin user \"{admin_user}\" failed: {e}"
                ),
            )
            .with_hint(format!(
                "upstream.admin_user \"{admin_user}\" must be a role that can log in through the gateway (certificate, or rds_iam on Amazon RDS) with CREATEROLE."
            ));
            return Err(error);
        }
    };
    let wanted = wanted_roles(db, auto, user);
    let mut action = "create";
    let work = async {
        admin
            .query(&format!("SELECT pg_advisory_lock({})", lock_key(user)))
            .await?;
        match admin.state(user).await? {
            None => {
                let mut sql = format!(
                    "DO $$BEGIN CREATE ROLE {marker} NOLOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END$$; \
                     CREATE ROLE {u} LOGIN; GRANT {marker} TO {u};",
                    marker = ident(MARKER_ROLE),
                    u = ident(user)
                );
                for r in &wanted {
                    sql.push_str(&format!(" GRANT {} TO {};", ident(r), ident(user)));
                }
                admin.query(&sql).await?;
                Ok::<_, Failure>(Some((wanted.clone(), Vec::new(), true)))
            }
            Some((_, false)) => Ok(None),
            Some((can_login, true)) => {
                action = "update";
                let granted = admin.granted(user).await?;
                let grant: Vec<String> = wanted
                    .iter()
                    .filter(|r| !granted.contains(r))
                    .cloned()
                    .collect();
                let revoke: Vec<String> = granted
                    .iter()
                    .filter(|r| !wanted.contains(r))
                    .cloned()
                    .collect();
                let mut sql = String::new();
                if !can_login {
                    sql.push_str(&format!("ALTER ROLE {} LOGIN;", ident(user)));
                }
                for r in &grant {
                    sql.push_str(&format!(" GRANT {} TO {};", ident(r), ident(user)));
                }
                for r in &revoke {
                    sql.push_str(&format!(" REVOKE {} FROM {};", ident(r), ident(user)));
                }
                if !sql.is_empty() {
                    admin.query(&sql).await?;
                }
                Ok(Some((grant, revoke, !sql.is_empty())))
            }
        }
    };
    let result = tokio::time::timeout(PROVISION_TIMEOUT, work)
        .await
        .unwrap_or(Err(Failure::Timeout));
    match result {
        Ok(Some((granted, revoked, changed))) => {
            if changed {
                tracing::info!(session = %info.session_id, %route, %user, action, ?wanted, "automatic database user");
                report.emit(action, &wanted, &granted, &revoked, None);
            }
            Ok(Box::new(Held {
                admin,
                user: user.to_owned(),
            }))
        }
        Ok(None) => {
            admin.close().await;
            Err(ErrorResponse::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!(
                    "db-gateway: database user \"{user}\" on \"{route}\" exists and is not managed by the gateway"
                ),
            )
            .with_hint(format!(
                "The policy creates users automatically (create_db_user_mode) but never alters one it did not create: drop \"{user}\", or make it a member of \"{MARKER_ROLE}\" to hand it over, or use another db_users name."
            )))
        }
        Err(failure) => {
            let error = to_client(failure, route, user, &admin_user);
            tracing::warn!(session = %info.session_id, %route, %user, e = %error.message, "automatic database user failed");
            report.emit(action, &wanted, &[], &[], Some(&error));
            admin.close().await;
            Err(error)
        }
    }
}

/// After a session of an automatic user: when no other session of the user is left (in
/// `pg_stat_activity`, all proxies), retires it as its mode says. `ended_pid` is the
/// backend of the session that ended (waited for until it is gone).
pub(super) async fn release(
    shared: &Shared,
    info: &SessionInfo,
    end: &AutoEnd,
    ended_pid: Option<i32>,
) {
    let user = end.user.as_str();
    let route = end.database.name.as_str();
    let report = Report {
        shared,
        info,
        route,
        user,
    };
    let mut admin = match Admin::connect(shared, &end.database).await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(session = %info.session_id, %route, %user, e = %e, "admin login to retire automatic user failed");
            let error = ErrorResponse::fatal(sqlstate::INSUFFICIENT_PRIVILEGE, e.to_string());
            report.emit("deactivate", &[], &[], &[], Some(&error));
            return;
        }
    };
    let mut action = "deactivate";
    let mut revoked = Vec::new();
    let work = async {
        if let Some(pid) = ended_pid {
            let deadline = tokio::time::Instant::now() + BACKEND_EXIT_WAIT;
            loop {
                let rows = admin
                    .query(&format!("SELECT 1 FROM pg_stat_activity WHERE pid = {pid}"))
                    .await?;
                if rows.is_empty() || tokio::time::Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        admin
            .query(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({})",
                lock_key(user)
            ))
            .await?;
        let others = admin
            .query(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = {} AND pid <> pg_backend_pid()",
                literal(user)
            ))
            .await?;
        let busy = others
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .is_none_or(|n| n != "0");
        if busy || admin.state(user).await? != Some((true, true)) {
            // Another session, a user already retired, or one not ours.
            admin.query("COMMIT").await?;
            return Ok(false);
        }
        if end.mode == CreateDbUserMode::BestEffortDrop {
            action = "drop";
            admin.query("SAVEPOINT drop_user").await?;
            match admin.query(&format!("DROP ROLE {}", ident(user))).await {
                Ok(_) => {
                    admin.query("COMMIT").await?;
                    return Ok(true);
                }
                // Objects depend on it: keep it, as `keep` does.
                Err(Failure::Sql(e)) if e.sqlstate == "2BP01" => {
                    tracing::info!(session = %info.session_id, %route, %user, reason = %e.message, "automatic user kept: objects depend on it");
                    admin.query("ROLLBACK TO SAVEPOINT drop_user").await?;
                    action = "deactivate";
                }
                Err(e) => return Err(e),
            }
        }
        revoked = admin.granted(user).await?;
        let mut sql = String::new();
        for r in &revoked {
            sql.push_str(&format!("REVOKE {} FROM {}; ", ident(r), ident(user)));
        }
        sql.push_str(&format!("ALTER ROLE {} NOLOGIN; COMMIT", ident(user)));
        admin.query(&sql).await?;
        Ok(true)
    };
    let result = tokio::time::timeout(PROVISION_TIMEOUT, work)
        .await
        .unwrap_or(Err(Failure::Timeout));
    match result {
        Ok(true) => {
            tracing::info!(session = %info.session_id, %route, %user, action, "automatic database user retired");
            report.emit(action, &[], &[], &revoked, None);
        }
        Ok(false) => {}
        Err(failure) => {
            let admin_user = end.database.upstream.admin_user.clone().unwrap_or_default();
            let error = to_client(failure, route, user, &admin_user);
            tracing::warn!(session = %info.session_id, %route, %user, e = %error.message, "retiring automatic database user failed");
            report.emit(action, &[], &[], &revoked, Some(&error));
        }
    }
    admin.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(ident("gateway-auto-user"), "\"gateway-auto-user\"");
        assert_eq!(literal("o'brien"), "'o''brien'");
        assert_eq!(lock_key("x'y"), "hashtext('db-gateway/auto-user/x''y')");
    }

    #[test]
    fn data_rows_parse_with_nulls() {
        let mut body = 2i16.to_be_bytes().to_vec();
        body.extend_from_slice(&1i32.to_be_bytes());
        body.push(b't');
        body.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(data_row(&body), Some(vec![Some("t".into()), None]));
        assert_eq!(data_row(&body[..5]), None);
    }
}
