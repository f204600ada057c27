//! The `gateway` command line: CA tools, `aws rds-token`'s flags (its tokens: `rds_iam.rs`),
//! configuration errors, and `gateway up` (the demo
//! that `cargo xtask demo` runs) from READY to a clean exit.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::gateway_bin;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dbgw-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn ca_init_and_issue_write_certificates_and_private_keys_0600() {
    let dir = temp_dir("ca");
    let ca = dir.join("ca");
    let run = |args: &[&str]| Command::new(gateway_bin()).args(args).output().unwrap();
    let o = run(&[
        "ca",
        "init",
        "--dir",
        ca.to_str().unwrap(),
        "--trust-domain",
        "example.org",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for key in ["workload-ca.key", "db-client-ca.key"] {
        let mode = std::fs::metadata(ca.join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    // A second init would orphan every issued certificate: refused.
    let o = run(&[
        "ca",
        "init",
        "--dir",
        ca.to_str().unwrap(),
        "--trust-domain",
        "example.org",
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already exists; refusing to overwrite a CA")
    );

    let out = dir.join("api");
    let o = Command::new(gateway_bin())
        .args([
            "ca",
            "issue",
            "--spiffe-id",
            "spiffe://example.org/ns/team-a/sa/api",
            "--ttl",
            "30m",
        ])
        .env("GATEWAY_CA_DIR", &ca)
        .env("GATEWAY_CERT_OUT", &out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mode = std::fs::metadata(out.with_extension("key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let pem = std::fs::read(out.with_extension("crt")).unwrap();
    let cert = CertificateDer::from_pem_slice(&pem).unwrap();
    assert_eq!(
        gateway::pki::spiffe_id_of(&cert).unwrap().to_string(),
        "spiffe://example.org/ns/team-a/sa/api"
    );

    let o = run(&[
        "ca",
        "issue",
        "--dir",
        ca.to_str().unwrap(),
        "--spiffe-id",
        "spiffe://other.org/ns/a/sa/b",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("is not in this CA's trust domain \"example.org\"")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_errors_name_file_line_and_field() {
    let dir = temp_dir("cfg");
    let file = dir.join("proxy.yaml");
    std::fs::write(
        &file,
        "listen: 127.0.0.1:0\ntrust_domain: example.org\ntls: { cert: a, key: b, client_ca: c }\ndb_client_ca: { cert: a, key: b }\ndatabases: []\nroles:\n  - name: r\n    match: { namespace: x }\n    databases: { names: [] }\n    db_users: [u]\n    db_names: [d]\n    colour: blue\n",
    )
    .unwrap();
    let o = Command::new(gateway_bin())
        .args(["proxy", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "gateway: error: {}:12:5: roles[0]: unknown field `colour`",
            file.display()
        )),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Starts `gateway up`, returns (child, directory, READY string, POD prefix if any).
#[test]
fn aws_rds_token_flags_are_checked_before_any_credential_is_asked_for() {
    let run = |args: &[&str]| {
        Command::new(gateway_bin())
            .args(["aws", "rds-token"])
            .args(args)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap()
    };
    let base = [
        "--host",
        "db.example",
        "--user",
        "app",
        "--region",
        "us-east-1",
    ];
    let o = run(&[&base[..], &["--at", "yesterday"]].concat());
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("invalid value 'yesterday' for '--at <AT>'"),
        "{err}"
    );
    let o = run(&[&base[..], &["--port", "70000"]].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--port"), "{err}");
    let o = run(&["--host", "db.example", "--user", "app"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--region <REGION>"),
        "{err}"
    );
}

fn start_up(args: &[&str]) -> (std::process::Child, String, String, Option<String>) {
    let mut child = Command::new(gateway_bin())
        .arg("up")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let dir = line
        .trim()
        .strip_prefix("db-gateway demo in ")
        .unwrap_or_else(|| panic!("first line names the directory: {line}"))
        .to_owned();
    // Keep draining stderr so the demo never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = stdout
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("READY ").map(str::to_owned))
        .expect("READY line");
    let pod = if args.contains(&"--explicit") || !gateway::harness::is_root() {
        None
    } else {
        let l = stdout.next().expect("POD line").unwrap();
        Some(l.strip_prefix("POD ").expect("POD line").to_owned())
    };
    (child, dir, ready, pod)
}

fn stop_up(mut child: std::process::Child, dir: &str) {
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t0 = Instant::now();
    let status = common::wait_exit(
        &mut child,
        t0 + Duration::from_secs(20),
        "gateway up did not stop",
    );
    assert!(status.success(), "{status}");
    assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
}

#[test]
fn gateway_up_explicit_prints_ready_serves_and_cleans_up() {
    let (child, dir, ready, pod) = start_up(&["--explicit"]);
    assert!(pod.is_none());
    let o = Command::new("psql")
        .arg(&ready)
        .args(["-XAtc", "select current_user"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "app",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stop_up(child, &dir);
    let o = Command::new("psql")
        .arg(format!("{ready} connect_timeout=2"))
        .args(["-XAtc", "select 1"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "still serving after exit");
}

#[test]
fn gateway_up_transparent_pod_reaches_the_original_address_and_cleans_up() {
    if !gateway::harness::root_or_skip("the transparent `gateway up` test") {
        return;
    }
    let (child, dir, ready, pod) = start_up(&[]);
    let pod = pod.expect("POD line as root");
    assert!(ready.contains("port=5432"), "{ready}");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("{pod} psql '{ready}' -XAtc 'select current_user'"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "app",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let netns = pod
        .split("--net=/run/netns/")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    stop_up(child, &dir);
    assert!(
        !std::path::Path::new(&format!("/run/netns/{netns}")).exists(),
        "namespace {netns} left behind"
    );
    let leftovers: Vec<_> = std::fs::read_dir("/sys/fs/bpf")
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("dbgw-up-"))
        .collect();
    assert!(leftovers.is_empty(), "pins left behind: {leftovers:?}");
}
