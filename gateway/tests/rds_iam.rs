//! Amazon RDS IAM authentication (issue 19): tokens byte-identical to botocore's
//! `generate_db_auth_token` (vectors from `vectors/rds_token.py`), from the proxy's code and
//! from `gateway aws rds-token` alike; credentials from the real `aws-config` provider chain
//! (environment, IRSA web identity against a local STS, EKS Pod Identity through a local
//! container credentials endpoint, an instance profile through a local IMDSv2, a shared
//! credentials file's named profile); and logins through node and proxy to a real
//! PostgreSQL behind a local RDS-style front (`harness::rds`) that verifies each token as
//! RDS does, with credentials that expire and are refreshed, and every refusal's exact
//! client error.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use common::*;
use gateway::config::{DatabaseConfig, UpstreamAuth, UpstreamConfig, UpstreamTlsMode};
use gateway::harness::aws::CredentialEndpoint;
use gateway::harness::rds::{AwsKey, AwsKeys, Endpoint, RdsFront, RdsFrontOptions, verify_token};
use gateway::harness::{Stack, Workload, temp_dir};
use gateway::upstream::rds_iam::{TokenKey, sign_token};

const REGION: &str = "us-east-1";
const IAM_HOST: &str = "mydb.cluster-abc123.us-east-1.rds.amazonaws.com";
const RESOURCE_ID: &str = "db-ABCDEFGHIJKL01234";
const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/db-gateway-proxy";
/// A projected service-account token, as the kubelet writes it (the content is opaque here).
const JWT: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGItZ2F0ZXdheTpwcm94eSJ9.c2ln";

/// `gateway aws rds-token ARGS` with only `env` for AWS: no profile files, no IMDS.
fn cli(env: &[(&str, String)], args: &[&str]) -> Output {
    Command::new(gateway_bin())
        .args(["aws", "rds-token"])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_CONFIG_FILE", "/nonexistent/config")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run gateway aws rds-token")
}

fn token_of(o: &Output) -> String {
    assert!(
        o.status.success(),
        "gateway aws rds-token failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(o).trim().to_owned()
}

#[test]
fn tokens_are_botocores_bytes_from_the_proxy_code_and_the_cli() {
    let file: serde_json::Value =
        serde_json::from_str(include_str!("vectors/rds_token.json")).unwrap();
    let vectors = file["vectors"].as_array().unwrap();
    assert!(vectors.len() >= 5);
    let s = |v: &serde_json::Value, k: &str| v[k].as_str().map(str::to_owned);
    for v in vectors {
        let name = s(v, "name").unwrap();
        let key = TokenKey {
            host: s(v, "host").unwrap(),
            port: v["port"].as_u64().unwrap() as u16,
            user: s(v, "user").unwrap(),
            region: s(v, "region").unwrap(),
        };
        let (akid, secret) = (
            s(v, "access_key_id").unwrap(),
            s(v, "secret_access_key").unwrap(),
        );
        let session_token = s(v, "session_token");
        let at = s(v, "at").unwrap();
        let at_time = humantime::parse_rfc3339(&at).unwrap();
        let want = s(v, "token").unwrap();

        // The proxy's code.
        let creds = Credentials::new(&akid, &secret, session_token.clone(), None, "vector");
        assert_eq!(sign_token(&key, &creds, at_time).unwrap(), want, "{name}");

        // The CLI, with the credentials in the environment (the chain's first source).
        let mut env = vec![
            ("AWS_ACCESS_KEY_ID", akid.clone()),
            ("AWS_SECRET_ACCESS_KEY", secret.clone()),
        ];
        if let Some(t) = &session_token {
            env.push(("AWS_SESSION_TOKEN", t.clone()));
        }
        let port = key.port.to_string();
        let args = [
            "--host",
            &key.host,
            "--port",
            &port,
            "--user",
            &key.user,
            "--region",
            &key.region,
            "--at",
            &at,
        ];
        assert_eq!(token_of(&cli(&env, &args)), want, "{name}: CLI");

        // The RDS stand-in's own check accepts it, and only as RDS would.
        let keys = AwsKeys::default();
        keys.insert(
            &akid,
            AwsKey {
                secret: secret.clone(),
                session_token: session_token.clone(),
                expires: None,
            },
        );
        let endpoint = Endpoint {
            host: key.host.clone(),
            port: key.port,
            region: key.region.clone(),
        };
        let minute = Duration::from_secs(60);
        verify_token(&want, &endpoint, &key.user, &keys, at_time + minute).unwrap();
        let e = verify_token(&want, &endpoint, "someone-else", &keys, at_time).unwrap_err();
        assert!(e.starts_with("token for"), "{name}: {e}");
        let e =
            verify_token(&want, &endpoint, &key.user, &keys, at_time + 16 * minute).unwrap_err();
        assert!(e.starts_with("token expired"), "{name}: {e}");
        let other_port = Endpoint {
            port: key.port + 1,
            ..endpoint.clone()
        };
        let e = verify_token(&want, &other_port, &key.user, &keys, at_time).unwrap_err();
        assert!(e.starts_with("signed for"), "{name}: {e}");
        keys.insert(
            &akid,
            AwsKey {
                secret: format!("{secret}x"),
                session_token,
                expires: None,
            },
        );
        let e = verify_token(&want, &endpoint, &key.user, &keys, at_time).unwrap_err();
        assert!(e.starts_with("signature does not match"), "{name}: {e}");
    }
}

fn endpoint() -> Endpoint {
    Endpoint {
        host: IAM_HOST.into(),
        port: 5432,
        region: REGION.into(),
    }
}

fn args_now() -> Vec<&'static str> {
    vec![
        "--host", IAM_HOST, "--port", "5432", "--user", "app", "--region", REGION,
    ]
}

#[test]
fn credentials_from_the_environment_sign_a_valid_token_now() {
    let keys = AwsKeys::default();
    keys.insert(
        "AKIAENVEXAMPLE",
        AwsKey {
            secret: "env/secret+key".into(),
            session_token: None,
            expires: None,
        },
    );
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIAENVEXAMPLE".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "env/secret+key".to_owned()),
    ];
    let token = token_of(&cli(&env, &args_now()));
    let used = verify_token(&token, &endpoint(), "app", &keys, SystemTime::now()).unwrap();
    assert_eq!(used.access_key_id, "AKIAENVEXAMPLE");
    assert!(!String::from_utf8_lossy(&cli(&env, &args_now()).stderr).contains("env/secret"));

    // No credentials anywhere: a clear failure, no token.
    let o = cli(&[], &args_now());
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("gateway: error: no AWS credentials"), "{err}");
}

fn write_token_file(dir: &Path, content: &str) -> String {
    let p = dir.join("token");
    std::fs::write(&p, content).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn irsa_web_identity_from_a_local_sts() {
    let keys = AwsKeys::default();
    let sts =
        CredentialEndpoint::sts(keys.clone(), ROLE_ARN, JWT, Duration::from_secs(3600)).unwrap();
    let dir = temp_dir("db-gateway-rds-irsa").unwrap();
    let env = |jwt: &str| {
        vec![
            ("AWS_ROLE_ARN", ROLE_ARN.to_owned()),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", write_token_file(&dir, jwt)),
            ("AWS_ROLE_SESSION_NAME", "db-gateway".to_owned()),
            ("AWS_ENDPOINT_URL_STS", sts.url("")),
            ("AWS_REGION", REGION.to_owned()),
        ]
    };
    let token = token_of(&cli(&env(JWT), &args_now()));
    assert_eq!(sts.issued.load(Ordering::SeqCst), 1);
    let used = verify_token(&token, &endpoint(), "app", &keys, SystemTime::now()).unwrap();
    assert!(used.access_key_id.starts_with("ASIA"), "{used:?}");
    assert!(token.contains("X-Amz-Security-Token=IQoJ"), "{token}");

    // STS refuses another token: no credentials, no token, and the reason is STS's.
    let o = cli(&env("not-the-projected-token"), &args_now());
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no AWS credentials"), "{err}");
    assert!(sts.refused.load(Ordering::SeqCst) >= 1);
    assert_eq!(sts.issued.load(Ordering::SeqCst), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eks_pod_identity_from_a_local_container_endpoint() {
    let keys = AwsKeys::default();
    let agent =
        CredentialEndpoint::container(keys.clone(), JWT, Duration::from_secs(3600)).unwrap();
    let dir = temp_dir("db-gateway-rds-pod-identity").unwrap();
    let env = |jwt: &str| {
        vec![
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                agent.url("/v1/credentials"),
            ),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                write_token_file(&dir, jwt),
            ),
        ]
    };
    let token = token_of(&cli(&env(JWT), &args_now()));
    assert_eq!(agent.issued.load(Ordering::SeqCst), 1);
    verify_token(&token, &endpoint(), "app", &keys, SystemTime::now()).unwrap();

    let o = cli(&env("wrong"), &args_now());
    assert!(!o.status.success());
    assert!(agent.refused.load(Ordering::SeqCst) >= 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_shared_profile_from_the_credentials_file() {
    let keys = AwsKeys::default();
    keys.insert(
        "AKIAPROFILEEXAMPLE",
        AwsKey {
            secret: "profile/secret+key".into(),
            session_token: None,
            expires: None,
        },
    );
    let dir = temp_dir("db-gateway-rds-profile").unwrap();
    let file = dir.join("credentials");
    std::fs::write(
        &file,
        "[default]\naws_access_key_id = AKIADEFAULTEXAMPLE\naws_secret_access_key = not-this-one\n\n\
         [db-gateway]\naws_access_key_id = AKIAPROFILEEXAMPLE\naws_secret_access_key = profile/secret+key\n",
    )
    .unwrap();
    // `cli` points AWS_SHARED_CREDENTIALS_FILE at nothing; this overrides it.
    let env = vec![
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            file.to_string_lossy().into_owned(),
        ),
        ("AWS_PROFILE", "db-gateway".to_owned()),
    ];
    let token = token_of(&cli(&env, &args_now()));
    let used = verify_token(&token, &endpoint(), "app", &keys, SystemTime::now()).unwrap();
    assert_eq!(used.access_key_id, "AKIAPROFILEEXAMPLE");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A raw HTTP request to `addr`; the status line of the answer.
fn status_of(addr: std::net::SocketAddr, request: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn imdsv2_instance_profile_from_a_local_metadata_service() {
    let keys = AwsKeys::default();
    let imds = CredentialEndpoint::imds(keys.clone(), "db-gateway-node", Duration::from_secs(3600))
        .unwrap();
    let env = vec![
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url("")),
        ("AWS_EC2_METADATA_DISABLED", "false".to_owned()),
    ];
    let token = token_of(&cli(&env, &args_now()));
    assert_eq!(imds.issued.load(Ordering::SeqCst), 1);
    // The chain asked for a session token first and sent it with every read.
    assert_eq!(imds.refused.load(Ordering::SeqCst), 0);
    let used = verify_token(&token, &endpoint(), "app", &keys, SystemTime::now()).unwrap();
    assert!(used.access_key_id.starts_with("ASIA"), "{used:?}");
    assert!(token.contains("X-Amz-Security-Token=IQoJ"), "{token}");

    // The local IMDS is IMDSv2-only, so the check above means something: a read without
    // a session token, or with one it did not issue, is refused.
    let path = "/latest/meta-data/iam/security-credentials/db-gateway-node";
    for header in ["", "x-aws-ec2-metadata-token: forged\r\n"] {
        let status = status_of(
            imds.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\n{header}Connection: close\r\n\r\n"),
        );
        assert!(status.contains(" 401"), "{header:?}: {status}");
    }
    assert_eq!(imds.issued.load(Ordering::SeqCst), 1);

    // IMDS down: no credentials, no token.
    imds.failing.store(true, Ordering::SeqCst);
    let o = cli(&env, &args_now());
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no AWS credentials"), "{err}");
}

fn rds_route(name: &str, front: &RdsFront) -> DatabaseConfig {
    DatabaseConfig {
        name: name.into(),
        labels: Default::default(),
        protocol: gateway::route::Protocol::Postgres,
        upstream: UpstreamConfig {
            address: front.addr.to_string(),
            auth: Some(UpstreamAuth::RdsIam),
            tls: UpstreamTlsMode::VerifyFull,
            ca: Some(front.ca.clone()),
            server_name: Some("localhost".into()),
            region: Some(REGION.into()),
            iam_host: Some(IAM_HOST.into()),
            account_id: None,
            resource_id: None,
            reuse: None,
            startup_parameters: Vec::new(),
            admin_user: None,
        },
    }
}

const API: usize = 0;
const WORKER: usize = 1;
const LATE: usize = 2;
const FORGED: usize = 3;
const PLAIN: usize = 4;
const LEGACY: usize = 5;

/// The client's error for a refused login: (SQLSTATE, message, hint).
async fn refused(s: &Stack, i: usize, user: &str) -> (String, String, String) {
    let Err(e) = connect(s, i, user, "app").await else {
        panic!("{user} logged in on listener {i}");
    };
    let db = e.as_db_error().unwrap_or_else(|| panic!("{e}"));
    (
        db.code().code().to_owned(),
        db.message().to_owned(),
        db.hint().unwrap_or_default().to_owned(),
    )
}

/// Sleeps until the wall-clock time `at` (credentials expire by the wall clock).
async fn sleep_until(at: SystemTime) {
    if let Ok(d) = at.duration_since(SystemTime::now()) {
        tokio::time::sleep(d).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_through_an_rds_front_with_refreshed_credentials_and_exact_refusals() {
    let keys = AwsKeys::default();
    // Short-lived Pod Identity credentials: the proxy must renew them halfway.
    let lifetime = Duration::from_secs(20);
    let agent = CredentialEndpoint::container(keys.clone(), JWT, lifetime).unwrap();
    let front = |f: fn(&mut RdsFrontOptions)| {
        let mut o = RdsFrontOptions {
            endpoint: Endpoint {
                host: IAM_HOST.into(),
                port: 0,
                region: REGION.into(),
            },
            keys: keys.clone(),
            iam_users: vec!["api".into()],
            clock_ahead: Duration::ZERO,
            plain: false,
            without_rds_iam: vec!["legacy".into()],
            rds_iam_from_database: false,
            iam_secret_differs: false,
        };
        f(&mut o);
        RdsFront::start(o).unwrap()
    };
    let good = front(|_| {});
    let late = front(|o| o.clock_ahead = Duration::from_secs(16 * 60));
    let forged = front(|o| o.iam_secret_differs = true);
    let plain = front(|o| o.plain = true);

    let dir = temp_dir("db-gateway-rds-e2e").unwrap();
    let mut spec = spec();
    let on = |route: &str, ns: &str, sa: &str| Workload {
        route: route.into(),
        ..Workload::new(ns, sa)
    };
    spec.workloads = vec![
        on("rds", "team-a", "api"),
        on("rds", "team-b", "worker"),
        on("rds-late", "team-a", "api"),
        on("rds-forged", "team-a", "api"),
        on("rds-plain", "team-a", "api"),
        on("rds", "team-c", "legacy"),
    ];
    // The main route names its account and resource id, so hints name the whole ARN.
    let mut with_ids = rds_route("rds", &good);
    with_ids.upstream.account_id = Some(gateway::harness::aws::ACCOUNT_ID.into());
    with_ids.upstream.resource_id = Some(RESOURCE_ID.into());
    spec.extra_databases = vec![
        with_ids,
        rds_route("rds-late", &late),
        rds_route("rds-forged", &forged),
        rds_route("rds-plain", &plain),
    ];
    let sa = "{{ .service_account }}";
    spec.roles = vec![
        role(
            "team-a",
            "team-a",
            &["rds", "rds-late", "rds-forged", "rds-plain"],
            &[sa],
            &["app"],
        ),
        role("team-b", "team-b", &["rds"], &[sa], &["app"]),
        role("team-c", "team-c", &["rds"], &[sa], &["app"]),
    ];
    spec.setup_sql
        .push("CREATE ROLE legacy LOGIN PASSWORD 'secret'".into());
    spec.proxy.env = vec![
        (
            "AWS_CONTAINER_CREDENTIALS_FULL_URI".into(),
            agent.url("/v1/credentials"),
        ),
        (
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE".into(),
            write_token_file(&dir, JWT),
        ),
        ("AWS_CONFIG_FILE".into(), "/nonexistent/config".into()),
        (
            "AWS_SHARED_CREDENTIALS_FILE".into(),
            "/nonexistent/credentials".into(),
        ),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
    ];
    let s = Stack::start(spec).expect("start the stack");
    for f in [&good, &late, &forged, &plain] {
        f.set_backend(s.pg.socket_dir.clone(), s.pg.port);
    }

    // A login RDS accepts: the session is PostgreSQL's, as the policy's user.
    let c = connect(&s, API, "api", "app")
        .await
        .expect("login through RDS IAM");
    let who: String = c
        .query_one("select current_user", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "api");
    drop(c);
    assert_eq!(agent.issued.load(Ordering::SeqCst), 1);
    let first = good.accepted.lock().unwrap()[0].clone();

    // The IAM policy does not allow this user: RDS's PAM failure, with the permission.
    let (code, message, hint) = refused(&s, WORKER, "worker").await;
    assert_eq!(code, "28P01");
    assert_eq!(
        message,
        "db-gateway: database \"rds\" refused IAM login as \"worker\": PAM authentication failed for user \"worker\""
    );
    assert!(
        hint.starts_with("The proxy's AWS identity needs rds-db:connect on arn:aws:rds-db:us-east-1:123456789012:dbuser:db-ABCDEFGHIJKL01234/worker,"),
        "{hint}"
    );
    assert!(
        good.refused.lock().unwrap()[0].contains("does not allow rds-db:connect as \"worker\"")
    );

    // Expired (the server's clock is past the token's 15 minutes). This route does not
    // name its account and resource id: the hint has placeholders for them.
    let (code, message, hint) = refused(&s, LATE, "api").await;
    assert!(
        hint.starts_with("The proxy's AWS identity needs rds-db:connect on arn:aws:rds-db:us-east-1:<account>:dbuser:<resource-id>/api,"),
        "{hint}"
    );
    assert_eq!(code, "28P01");
    assert_eq!(
        message,
        "db-gateway: database \"rds-late\" refused IAM login as \"api\": PAM authentication failed for user \"api\""
    );
    assert!(late.refused.lock().unwrap()[0].starts_with("token expired"));

    // A signature IAM does not recognize.
    let (code, message, _) = refused(&s, FORGED, "api").await;
    assert_eq!(code, "28P01");
    assert!(
        message.starts_with("db-gateway: database \"rds-forged\" refused IAM login"),
        "{message}"
    );
    assert!(forged.refused.lock().unwrap()[0].starts_with("signature does not match"));

    // A server without TLS never sees a token.
    let (code, message, hint) = refused(&s, PLAIN, "api").await;
    assert_eq!(code, "08006");
    assert_eq!(
        message,
        format!(
            "db-gateway: connection to database \"rds-plain\" failed: server {} does not accept TLS connections",
            plain.addr
        )
    );
    assert!(hint.contains("only over TLS"), "{hint}");
    assert!(plain.accepted.lock().unwrap().is_empty() && plain.refused.lock().unwrap().is_empty());

    // A role without rds_iam: RDS asks for SCRAM, and the gateway has no password to give.
    let (code, message, hint) = refused(&s, LEGACY, "legacy").await;
    assert_eq!(code, "28000");
    assert_eq!(
        message,
        "db-gateway: database \"rds\" refused login as \"legacy\": server asked for a password the gateway does not hold (SCRAM)"
    );
    assert!(hint.contains("GRANT rds_iam TO \"legacy\""), "{hint}");
    wait_for("the front to see the gateway close", || {
        good.refused
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.contains("asked for SCRAM"))
    })
    .await;

    // Past half the credentials' life (renewed by the background refresh or by this
    // login, whichever comes first): a token signed with new credentials.
    let expiry = |keys: &AwsKeys| keys.latest_expiry().unwrap();
    sleep_until(expiry(&keys) - lifetime / 2 + Duration::from_secs(1)).await;
    let c = connect(&s, API, "api", "app")
        .await
        .expect("login with renewed credentials");
    drop(c);
    assert!(agent.issued.load(Ordering::SeqCst) >= 2);
    let second = good.accepted.lock().unwrap().last().unwrap().clone();
    assert_ne!(second.access_key_id, first.access_key_id);

    // The endpoint goes down: past their renewal, credentials that have not expired still
    // sign; the failure to renew is counted.
    agent.failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let last = expiry(&keys);
    sleep_until(last - Duration::from_secs(3)).await;
    let c = connect(&s, API, "api", "app")
        .await
        .expect("login with the last credentials");
    drop(c);
    let failures = |s: &Stack| {
        metric(
            &scrape(s.proxy_admin),
            "gateway_proxy_aws_credential_failures_total",
        )
        .unwrap()
    };
    assert!(failures(&s) >= 1.0);
    assert_eq!(
        expiry(&keys),
        last,
        "credentials issued while the endpoint was down"
    );

    // Once they have expired, sessions that need a token get 28000 naming the permission.
    sleep_until(last + Duration::from_secs(1)).await;
    let (code, message, hint) = refused(&s, API, "api").await;
    assert_eq!(code, "28000");
    assert!(
        message.starts_with(
            "db-gateway: cannot log in to database \"rds\" as \"api\": no AWS credentials"
        ),
        "{message}"
    );
    assert!(
        hint.contains(
            "rds-db:connect on arn:aws:rds-db:us-east-1:123456789012:dbuser:db-ABCDEFGHIJKL01234/api;"
        ),
        "{hint}"
    );
    let scraped = scrape(s.proxy_admin);
    assert!(metric(&scraped, "gateway_proxy_rds_tokens_signed_total").unwrap() >= 3.0);

    // No token, secret or session token in the proxy's log.
    let log = s.log("proxy");
    assert!(
        !log.contains("X-Amz-Signature") && !log.contains("IQoJ"),
        "{log}"
    );
    for k in keys.all_secrets() {
        assert!(!log.contains(&k), "secret in the proxy log");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
