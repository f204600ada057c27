//! Which of a client's startup parameters reach the server.
//!
//! A startup parameter is a setting applied with the logged-in user's privileges before the
//! first query, so it can do what the policy's choice of database user was meant to stop:
//! `role` / `session_authorization` switch to another role the user is a member of,
//! `replication` opens a walsender (a copy of the whole cluster for a user with
//! `REPLICATION`), and `options` carries any of those as `-c name=value`. So the gateway
//! forwards an allow-list, as PgBouncer does (`ignore_startup_parameters`), and refuses
//! anything else with a message naming the parameter rather than dropping it silently
//! (a dropped `search_path` or `statement_timeout` would change what the application runs).
//! The list holds what the drivers we test send (libpq, pgjdbc, node-postgres, asyncpg,
//! pgx, tokio-postgres) and the settings applications commonly set; a database route can
//! allow more with `upstream.startup_parameters`.

use crate::pg::{ErrorResponse, sqlstate};

/// Settings any client may set at startup: session-local formatting, naming and timeouts,
/// none of which changes who the session is or what it may read.
pub const ALLOWED: &[&str] = &[
    "application_name",
    "fallback_application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "intervalstyle",
    "extra_float_digits",
    "search_path",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "default_transaction_deferrable",
    "standard_conforming_strings",
    "bytea_output",
    "geqo",
    "jit",
    "work_mem",
];

/// Parameters that change the session's identity or privileges: refused as a privilege
/// error (not a protocol one) so the client's log says why.
use crate::config::PRIVILEGED_STARTUP_PARAMETERS as PRIVILEGED;

/// The startup parameter that opens a walsender (`replication=true|database`): refused
/// unless the route lists it in `upstream.startup_parameters`.
pub const REPLICATION: &str = "replication";

/// Parameters the proxy itself answers or the policy decides; never forwarded as sent.
fn is_ours(name: &str) -> bool {
    name == "user" || name == "database" || name.starts_with("_pq_.")
}

/// Checks every startup parameter of a client; `extra` is the route's own allow-list.
/// On success returns the parameters to send upstream (without `user`, `database` and
/// protocol options), in the client's order.
pub fn check<'a>(
    params: &'a [(String, String)],
    extra: &[String],
) -> Result<Vec<(&'a str, &'a str)>, ErrorResponse> {
    let mut out = Vec::new();
    for (name, value) in params {
        if is_ours(name) {
            continue;
        }
        if name == "options" {
            for setting in parse_options(value)? {
                allowed(&setting, extra, "options")?;
            }
        } else {
            allowed(name, extra, "startup")?;
        }
        out.push((name.as_str(), value.as_str()));
    }
    Ok(out)
}

/// GUC names are case-insensitive, `-` and `_` alike in `options` (PostgreSQL's rule).
fn allowed(name: &str, extra: &[String], via: &str) -> Result<(), ErrorResponse> {
    let norm = name.to_ascii_lowercase().replace('-', "_");
    if norm == REPLICATION {
        // The one privileged parameter a route may allow, as a startup parameter only (it is
        // not a setting `options` could carry): a route for CDC tools that need a walsender.
        if via == "startup" && extra.iter().any(|e| e.eq_ignore_ascii_case(REPLICATION)) {
            return Ok(());
        }
        return Err(ErrorResponse::fatal(
            sqlstate::INSUFFICIENT_PRIVILEGE,
            format!("db-gateway: the {via} parameter \"{name}\" is not allowed through the gateway"),
        )
        .with_hint(
            "Replication connections (a walsender: physical or logical streaming over CopyBoth) are refused unless the route lists \"replication\" in upstream.startup_parameters; the gateway's policy chooses the database user, which then also needs the REPLICATION attribute.",
        ));
    }
    if PRIVILEGED.contains(&norm.as_str()) {
        return Err(ErrorResponse::fatal(
            sqlstate::INSUFFICIENT_PRIVILEGE,
            format!("db-gateway: the {via} parameter \"{name}\" is not allowed through the gateway"),
        )
        .with_hint(
            "The gateway's policy chooses the database user; a client cannot change role, session authorization or open a replication connection at startup.",
        ));
    }
    if ALLOWED.contains(&norm.as_str()) || extra.iter().any(|e| e.eq_ignore_ascii_case(&norm)) {
        return Ok(());
    }
    Err(ErrorResponse::fatal(
        sqlstate::PROTOCOL_VIOLATION,
        format!("db-gateway: unsupported {via} parameter \"{name}\""),
    )
    .with_hint(format!(
        "Set it with SET after connecting, or ask an operator to add \"{norm}\" to the route's upstream.startup_parameters."
    )))
}

/// The setting names in a libpq `options` string: words split on unescaped spaces
/// (`\` escapes the next character), each `-c name=value`, `-cname=value` or
/// `--name=value`. Any other backend switch (`-F`, `-d`, …) is refused: they change
/// server behaviour (`-F` turns fsync off) and no driver sends them.
fn parse_options(s: &str) -> Result<Vec<String>, ErrorResponse> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let bad = |w: &str| {
        ErrorResponse::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!("db-gateway: unsupported item \"{w}\" in the startup parameter \"options\""),
        )
        .with_hint("Only \"-c name=value\" and \"--name=value\" settings are forwarded in options.")
    };
    let mut names = Vec::new();
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let setting = if w == "-c" {
            words.next().ok_or_else(|| bad(&w))?
        } else if let Some(rest) = w.strip_prefix("-c").or_else(|| w.strip_prefix("--")) {
            rest.to_owned()
        } else {
            return Err(bad(&w));
        };
        let (name, _) = setting.split_once('=').ok_or_else(|| bad(&setting))?;
        if name.is_empty() {
            return Err(bad(&setting));
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn refused(v: &[(&str, &str)]) -> ErrorResponse {
        check(&params(v), &[]).expect_err("refused")
    }

    #[test]
    fn hardening_04_startup_parameters_follow_an_allow_list() {
        let p = params(&[
            ("user", "x"),
            ("database", "y"),
            ("_pq_.ext", "1"),
            ("application_name", "app"),
            ("DateStyle", "ISO"),
            (
                "options",
                "-c search_path=a\\ b --statement-timeout=5s -cwork_mem=4MB",
            ),
        ]);
        let out = check(&p, &[]).unwrap();
        let names: Vec<&str> = out.iter().map(|(k, _)| *k).collect();
        assert_eq!(names, ["application_name", "DateStyle", "options"]);

        for (k, v) in [
            ("role", "postgres"),
            ("session_authorization", "postgres"),
            ("replication", "database"),
            ("options", "-c role=postgres"),
            ("options", "-csession_authorization=postgres"),
            ("options", "--session-authorization=postgres"),
            ("options", "-c search_path=x -c ROLE=admin"),
        ] {
            let e = refused(&[(k, v)]);
            assert_eq!(e.sqlstate, "42501", "{k}={v}: {e:?}");
            assert!(
                e.hint.as_deref().unwrap().contains("policy chooses"),
                "{e:?}"
            );
        }
        for (k, v) in [
            ("plan_cache_mode", "force_generic_plan"),
            ("options", "-F"),
            ("options", "-c"),
            ("options", "-c noequals"),
            ("options", "-c =x"),
            ("options", "-c log_statement=all"),
        ] {
            let e = refused(&[(k, v)]);
            assert_eq!(e.sqlstate, "08P01", "{k}={v}: {e:?}");
            assert!(e.hint.is_some(), "{e:?}");
        }
        let e = refused(&[("plan_cache_mode", "auto")]);
        assert!(
            e.hint
                .unwrap()
                .contains("\"plan_cache_mode\" to the route's upstream.startup_parameters"),
        );
        // A route may allow more; privileged ones stay refused even when listed.
        let extra = ["plan_cache_mode".to_owned(), "role".to_owned()];
        assert!(check(&params(&[("plan_cache_mode", "auto")]), &extra).is_ok());
        let e = check(&params(&[("role", "x")]), &extra).unwrap_err();
        assert_eq!(e.sqlstate, "42501");
    }

    #[test]
    fn issue_20_replication_only_where_the_route_lists_it() {
        let e = refused(&[("replication", "database")]);
        assert_eq!(e.sqlstate, "42501");
        assert!(
            e.hint
                .as_deref()
                .unwrap()
                .contains("unless the route lists \"replication\" in upstream.startup_parameters"),
            "{e:?}"
        );
        let extra = ["Replication".to_owned()];
        let asked = params(&[("replication", "database")]);
        let out = check(&asked, &extra).unwrap();
        assert_eq!(out, [("replication", "database")]);
        // Listing it allows the startup parameter, not a setting in `options`.
        let e = check(&params(&[("options", "-c replication=true")]), &extra).unwrap_err();
        assert_eq!(e.sqlstate, "42501");
    }
}
