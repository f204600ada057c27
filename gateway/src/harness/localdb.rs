//! A throwaway local PostgreSQL 15 server for tests and for the `gateway up` demo.
//!
//! The proxy logs in to the database with client certificates, so tests need a real server
//! configured the way production is: TLS on, certificate authentication on TCP, nothing else
//! accepted over the network. [`start`] builds one in a private temporary directory
//! (`initdb`, our `postgresql.conf` settings and `pg_hba.conf`), runs `postgres` as a child
//! process on a free loopback port and waits until it accepts connections. Dropping the
//! returned [`LocalPostgres`] stops the server and deletes the directory, also when a test
//! panics (unwinding runs `Drop`).
//!
//! The unix socket stays open with `trust` so the harness itself (and [`LocalPostgres::psql`])
//! can create roles and databases without any credential.
//!
//! PostgreSQL refuses to run as root. When we are root (CI containers, `cargo xtask demo` on
//! a fresh machine) the directory is handed to the `postgres` system user and `initdb` and
//! `postgres` run as that user.
//!
//! Limits: the server is a child of this process, not a daemon. If this process is killed
//! with SIGKILL, `Drop` does not run and the server and its directory are left behind. Ctrl-C
//! in a terminal reaches the server too (same process group), which then shuts down on its own.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

pub use self::host::BIN_DIR_ENV;
use self::host::{ServiceUser, chown, create_root_dir, find_bin_dir, service_user};
use super::machine::free_port;

mod host;

/// The superuser created by `initdb -U`, used over the trusted unix socket.
const SUPERUSER: &str = "postgres";
/// Every address the server listens on; the TCP side only takes certificate logins.
const LISTEN_HOST: &str = "127.0.0.1";
/// Another process may grab the port between our probe and the server's bind; retry this often.
const PORT_ATTEMPTS: u32 = 5;
/// How long the server may take to accept connections (crash recovery never happens here,
/// so this is only slow disks and busy CI machines).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an immediate shutdown may take before we SIGKILL the postmaster.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval for readiness and shutdown.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How much of the server log goes into an error message.
const LOG_TAIL_BYTES: u64 = 4096;

/// TLS material and extra authentication rules for a [`LocalPostgres`].
#[derive(Clone)]
pub struct LocalPostgresOptions {
    /// The server certificate chain (PEM) presented on TLS connections.
    pub server_cert_pem: String,
    /// The server's private key (PEM). Written with mode 0600, as PostgreSQL requires.
    pub server_key_pem: String,
    /// The CA (PEM) that signs database-client certificates (`ssl_ca_file`).
    pub client_ca_pem: String,
    /// `pg_hba.conf` lines placed before the default rules; the first matching line wins,
    /// so these take precedence.
    pub extra_hba: Vec<String>,
}

impl fmt::Debug for LocalPostgresOptions {
    // The private key stays out of logs and test output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalPostgresOptions")
            .field("server_cert_pem", &self.server_cert_pem)
            .field("server_key_pem", &"<redacted>")
            .field("client_ca_pem", &self.client_ca_pem)
            .field("extra_hba", &self.extra_hba)
            .finish()
    }
}

/// A running local PostgreSQL server. Dropping it stops the server and removes its directory.
#[derive(Debug)]
pub struct LocalPostgres {
    /// The TCP port on [`LocalPostgres::host`], which takes only TLS certificate logins; the
    /// unix socket in [`LocalPostgres::socket_dir`] uses the same port number.
    pub port: u16,
    /// Always `127.0.0.1`.
    pub host: String,
    /// The cluster's data directory (`PGDATA`).
    pub data_dir: PathBuf,
    /// The directory holding the unix socket; the socket trusts every local user.
    pub socket_dir: PathBuf,
    /// The server's stdout and stderr.
    pub log_path: PathBuf,
    /// The PostgreSQL binaries in use (`psql`, `pgbench`… live here too).
    pub bin_dir: PathBuf,
    /// The temporary directory holding everything above; removed on drop.
    root_dir: PathBuf,
    /// Who runs the server: `None` for ourselves, else the `postgres` system user.
    run_as: Option<ServiceUser>,
    /// The postmaster, while it runs.
    postmaster: Option<Child>,
}

/// Why a postmaster did not come up, split so that a lost port race can be retried.
enum LaunchError {
    PortTaken,
    Other(anyhow::Error),
}

impl From<anyhow::Error> for LaunchError {
    fn from(e: anyhow::Error) -> Self {
        LaunchError::Other(e)
    }
}

/// Creates a cluster in a new temporary directory, starts it and waits until it accepts
/// connections.
pub fn start(opts: LocalPostgresOptions) -> Result<LocalPostgres> {
    let bin_dir = find_bin_dir()?;
    let run_as = service_user()?;
    let root_dir = create_root_dir(run_as)?;
    // From here on `Drop` cleans up after any failure.
    let mut pg = LocalPostgres {
        port: 0,
        host: LISTEN_HOST.to_owned(),
        data_dir: root_dir.join("data"),
        socket_dir: root_dir.join("sock"),
        log_path: root_dir.join("postgres.log"),
        bin_dir,
        root_dir,
        run_as,
        postmaster: None,
    };
    pg.init_cluster(&opts)
        .with_context(|| format!("failed to create a cluster in {}", pg.root_dir.display()))?;
    pg.launch()?;
    Ok(pg)
}

impl LocalPostgres {
    /// Runs `sql` with `psql` as the superuser over the unix socket and returns psql's stdout
    /// (unaligned, tuples only: one line per row, `|` between columns, trailing newline kept).
    pub fn psql(&self, sql: &str) -> Result<String> {
        self.psql_db("postgres", sql)
    }

    /// Like [`Self::psql`], in database `db`.
    pub fn psql_db(&self, db: &str, sql: &str) -> Result<String> {
        let mut psql = self.client_command("psql");
        psql.arg("-h")
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args([
                "-U",
                SUPERUSER,
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-XAtq",
                "-c",
            ])
            .arg(sql);
        let stdout = run_ok(&mut psql, "psql").with_context(|| format!("running {sql:?}"))?;
        String::from_utf8(stdout).context("psql printed non-UTF-8 output")
    }

    /// A libpq `key=value` connection string for the superuser over the unix socket (no
    /// password: the socket is trusted). Works with `psql` and `tokio-postgres`.
    pub fn admin_conn_string(&self) -> String {
        format!(
            "host={} port={} user={} dbname=postgres",
            libpq_quote(&self.socket_dir.to_string_lossy()),
            self.port,
            SUPERUSER
        )
    }

    /// Runs `initdb`, writes the TLS files and our settings.
    fn init_cluster(&self, opts: &LocalPostgresOptions) -> Result<()> {
        let tls_dir = self.root_dir.join("tls");
        for dir in [&self.socket_dir, &tls_dir] {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("failed to create {}", dir.display()))?;
            self.give_to_service_user(dir)?;
        }
        let cert_file = tls_dir.join("server.crt");
        let key_file = tls_dir.join("server.key");
        let ca_file = tls_dir.join("client-ca.crt");
        self.write_private_file(&cert_file, &opts.server_cert_pem)?;
        // PostgreSQL refuses a key readable by group or others, or owned by another user.
        self.write_private_file(&key_file, &opts.server_key_pem)?;
        self.write_private_file(&ca_file, &opts.client_ca_pem)?;

        let mut initdb = self.server_command("initdb");
        initdb.arg("-D").arg(&self.data_dir).args([
            "-A",
            "trust",
            "-U",
            SUPERUSER,
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        run_ok(&mut initdb, "initdb")?;

        // Appended settings override initdb's defaults (the last occurrence wins). The port is
        // not here: it is a command-line flag so a retry can change it.
        let settings = [
            ("listen_addresses", conf_quote(LISTEN_HOST)),
            ("unix_socket_directories", conf_path(&self.socket_dir)),
            // Tests open many sessions at once through the proxy.
            ("max_connections", "200".to_owned()),
            // A throwaway cluster: durability only costs time.
            ("fsync", "off".to_owned()),
            ("shared_buffers", "128MB".to_owned()),
            ("ssl", "on".to_owned()),
            ("ssl_cert_file", conf_path(&cert_file)),
            ("ssl_key_file", conf_path(&key_file)),
            ("ssl_ca_file", conf_path(&ca_file)),
        ];
        let mut conf = String::from("\n# db-gateway localdb\n");
        for (name, value) in settings {
            conf.push_str(&format!("{name} = {value}\n"));
        }
        let conf_file = self.data_dir.join("postgresql.conf");
        OpenOptions::new()
            .append(true)
            .open(&conf_file)
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .with_context(|| format!("failed to append to {}", conf_file.display()))?;

        // Only certificate logins over TLS on TCP: the proxy must prove it can authenticate
        // the way it will against a production server. The socket is the harness's back door.
        let mut hba = String::from("# db-gateway localdb: first match wins\n");
        for line in &opts.extra_hba {
            hba.push_str(line);
            hba.push('\n');
        }
        hba.push_str("local all all trust\n");
        hba.push_str(&format!("hostssl all all {LISTEN_HOST}/32 cert\n"));
        hba.push_str(&format!("host all all {LISTEN_HOST}/32 reject\n"));
        let hba_file = self.data_dir.join("pg_hba.conf");
        fs::write(&hba_file, hba).with_context(|| format!("failed to write {}", hba_file.display()))
    }

    /// Starts the postmaster on a free port, retrying when another process wins the port.
    fn launch(&mut self) -> Result<()> {
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            match self.launch_on(port) {
                Ok(()) => return Ok(()),
                Err(LaunchError::PortTaken) => continue,
                Err(LaunchError::Other(e)) => return Err(e),
            }
        }
        bail!(
            "postgres could not bind a free port on {LISTEN_HOST} in {PORT_ATTEMPTS} attempts; \
             server log (tail):\n{}",
            self.log_tail()
        )
    }

    fn launch_on(&mut self, port: u16) -> std::result::Result<(), LaunchError> {
        // Truncated per attempt, so the log only tells about this port.
        let log = File::create(&self.log_path)
            .with_context(|| format!("failed to create {}", self.log_path.display()))?;
        let log_err = log
            .try_clone()
            .context("failed to duplicate the log file")?;
        let child = self
            .server_command("postgres")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .context("failed to start postgres")?;
        self.postmaster = Some(child);
        self.port = port;

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = match self.postmaster.as_mut() {
                Some(child) => child.try_wait().context("failed to poll postgres")?,
                None => None,
            };
            if let Some(status) = exited {
                self.postmaster = None;
                let tail = self.log_tail();
                // lc_messages is C (initdb --locale=C), so the message is in English.
                if tail.contains("Address already in use") {
                    return Err(LaunchError::PortTaken);
                }
                return Err(anyhow!(
                    "postgres exited ({status}) before accepting connections; \
                     server log (tail):\n{tail}"
                )
                .into());
            }
            if self.is_ready()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop_postmaster();
                return Err(anyhow!(
                    "postgres did not accept connections within {READY_TIMEOUT:?}; \
                     server log (tail):\n{}",
                    self.log_tail()
                )
                .into());
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// `pg_isready` on the unix socket; the TCP listener is bound before the socket is created.
    fn is_ready(&self) -> Result<bool> {
        let status = self
            .client_command("pg_isready")
            .arg("-h")
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", SUPERUSER, "-d", "postgres", "-t", "1", "-q"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("failed to run pg_isready")?;
        Ok(status.success())
    }

    /// Immediate shutdown (what `pg_ctl stop -m immediate` sends), then SIGKILL if it hangs.
    /// Waits for the postmaster so its port and socket are gone when this returns.
    fn stop_postmaster(&mut self) {
        let Some(mut child) = self.postmaster.take() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill has no memory effects; `pid` is our unreaped child, so it cannot
            // have been recycled for another process.
            unsafe { libc::kill(pid, libc::SIGQUIT) };
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) => thread::sleep(POLL_INTERVAL),
                Err(_) => break,
            }
        }
        if let Err(e) = child.kill().and_then(|()| child.wait().map(drop)) {
            tracing::warn!(pid = child.id(), "failed to kill postgres: {e}");
        }
    }

    /// A command for a server binary, run as the service user when we are root.
    fn server_command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(name));
        // Server messages in English so the log can be matched (and read by anyone).
        cmd.env("LC_ALL", "C");
        // The caller's working directory may be closed to the service user.
        cmd.current_dir(&self.root_dir);
        if let Some(user) = self.run_as {
            // std also calls setgroups(0) before setuid when no groups are given, so root's
            // supplementary groups do not leak into the server.
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd
    }

    /// A command for a client binary, run as ourselves: the trusted socket does not care who
    /// we are. Inherited `PG*` variables (PGSSLMODE, PGOPTIONS, PGSERVICE…) are dropped so
    /// they cannot change what we connect to.
    fn client_command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(name));
        for (key, _) in std::env::vars_os() {
            if key.as_bytes().starts_with(b"PG") {
                cmd.env_remove(key);
            }
        }
        cmd.env("PGCONNECT_TIMEOUT", "10");
        cmd
    }

    /// Writes a file readable only by its owner, owned by the service user.
    fn write_private_file(&self, path: &Path, contents: &str) -> Result<()> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| f.write_all(contents.as_bytes()))
            .with_context(|| format!("failed to write {}", path.display()))?;
        self.give_to_service_user(path)
    }

    fn give_to_service_user(&self, path: &Path) -> Result<()> {
        match self.run_as {
            Some(user) => chown(path, user),
            None => Ok(()),
        }
    }

    /// The end of the server log, for error messages.
    fn log_tail(&self) -> String {
        let read = || -> io::Result<String> {
            let mut file = File::open(&self.log_path)?;
            let len = file.metadata()?.len();
            file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        };
        read().unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        self.stop_postmaster();
        if let Err(e) = fs::remove_dir_all(&self.root_dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("failed to remove {}: {e}", self.root_dir.display());
        }
    }
}

/// Runs `cmd` with stdin closed and returns its stdout; fails with its stderr unless it
/// exits with 0.
fn run_ok(cmd: &mut Command, what: &str) -> Result<Vec<u8>> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to run {what}"))?;
    ensure!(
        output.status.success(),
        "{what} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim_end()
    );
    Ok(output.stdout)
}

/// A `postgresql.conf` string literal.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

fn conf_path(path: &Path) -> String {
    conf_quote(&path.to_string_lossy())
}

/// A libpq connection-string value: quoted when empty or holding spaces, quotes or backslashes.
fn libpq_quote(value: &str) -> String {
    if !value.is_empty() && !value.contains([' ', '\'', '\\']) {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr, TcpStream};

    use super::*;

    fn self_signed_options(extra_hba: Vec<String>) -> LocalPostgresOptions {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        LocalPostgresOptions {
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
            // Any CA will do for starting the server; this one signs no clients.
            client_ca_pem: cert.pem(),
            extra_hba,
        }
    }

    #[test]
    fn starts_answers_and_cleans_up() {
        let pg = start(self_signed_options(vec![
            "host all all ::1/128 reject".into(),
        ]))
        .unwrap();
        assert_eq!(pg.host, "127.0.0.1");
        assert_eq!(pg.psql("select 1").unwrap(), "1\n");
        assert_eq!(pg.psql("show ssl").unwrap(), "on\n");
        assert_eq!(pg.psql("show max_connections").unwrap(), "200\n");
        // The server parsed our pg_hba.conf: extra line first, then the defaults.
        let rules = pg
            .psql(
                "select string_agg(type || ':' || auth_method, ',' order by line_number) \
                 from pg_hba_file_rules",
            )
            .unwrap();
        assert_eq!(
            rules.trim_end(),
            "host:reject,local:trust,hostssl:cert,host:reject"
        );
        assert!(
            pg.admin_conn_string()
                .contains(&format!("port={}", pg.port))
        );
        if pg.run_as.is_some() {
            // Started by root: the server must not keep root's supplementary groups.
            let pid = pg.postmaster.as_ref().unwrap().id();
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let groups = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
            assert_eq!(groups.trim_end(), "Groups:");
        }
        let err = pg.psql("select from no_such_table").unwrap_err();
        assert!(format!("{err:#}").contains("no_such_table"), "{err:#}");

        // TCP takes only TLS with a client certificate.
        let tcp_login_error = |sslmode: &str| {
            let output = pg
                .client_command("psql")
                .arg(format!(
                    "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode={sslmode}",
                    pg.port
                ))
                .args(["-XAtq", "-c", "select 1"])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(!output.status.success());
            String::from_utf8_lossy(&output.stderr).into_owned()
        };
        let plain = tcp_login_error("disable");
        assert!(plain.contains("no encryption"), "{plain}");
        let no_cert = tcp_login_error("require");
        assert!(no_cert.contains("certificate"), "{no_cert}");

        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, pg.port));
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        let data_dir = pg.data_dir.clone();
        let root_dir = pg.root_dir.clone();
        drop(pg);
        assert!(!data_dir.exists(), "{} still exists", data_dir.display());
        assert!(!root_dir.exists(), "{} still exists", root_dir.display());
        assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn invalid_extra_hba_fails_with_the_server_log() {
        let err = start(self_signed_options(vec!["nonsense line".into()])).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("pg_hba.conf"), "{msg}");
    }

    #[test]
    fn libpq_values_are_quoted_when_needed() {
        assert_eq!(libpq_quote("/tmp/x"), "/tmp/x");
        assert_eq!(libpq_quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(libpq_quote(r"it's\"), r"'it\'s\\'");
        assert_eq!(libpq_quote(""), "''");
    }
}
