//! Starting the real `internet2-server` binary on `[::1]` for tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const SERVER: &str = env!("CARGO_BIN_EXE_internet2-server");
pub const CLIENT: &str = env!("CARGO_BIN_EXE_internet2");

/// Whether capability-dependent tests must run (CI is root and capable).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skip with a printed reason, or fail in CI where the capability must exist.
pub fn skip_or_fail(reason: &str) {
    if in_ci() {
        panic!("CI must be able to run this test, but: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

/// Run `ip ARGS`; fail the test, with ip's error, if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Uid:")
                    .map(|v| v.split_whitespace().nth(1) == Some("0"))
            })
        })
        .unwrap_or(false)
}

/// A UDP port free on [::1] right now (IPv6 only).
pub fn free_port() -> u16 {
    let socket = UdpSocket::bind(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 0, 0, 0))
        .expect("bind an ephemeral port");
    socket.local_addr().unwrap().port()
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "i2-test-{tag}-{}-{}",
        std::process::id(),
        free_port()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub struct Server {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    pub stderr: mpsc::Receiver<String>,
}

impl Server {
    /// Start with `extra` TOML appended to a config that binds [::1] on a
    /// fresh port; waits for the `listening` line.
    pub fn start(tag: &str, extra: &str) -> Server {
        Server::start_in(tag, "::1", extra, &[])
    }

    /// Start as `--mode production` runs it, with its defaults (mandatory
    /// admission, plot_k 18, no development stake …): only bind, port and
    /// data dir are set, plus the `[hypermesh_assets]` keys in `assets`
    /// (none keeps every production default).
    pub fn start_production(tag: &str, assets: &str) -> Server {
        Server::start_production_with(tag, assets, &[])
    }

    /// [`Self::start_production`], with `args` after `--mode production`.
    pub fn start_production_with(tag: &str, assets: &str, args: &[&str]) -> Server {
        let server_args: Vec<&str> = ["--mode", "production"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        Server::start_with(
            tag,
            "::1",
            &format!("[hypermesh_assets]\n{assets}"),
            &[],
            &server_args,
        )
    }

    /// Start bound to `bind`, the command prefixed by `wrapper` (for
    /// `ip netns exec NS`).
    pub fn start_in(tag: &str, bind: &str, extra: &str, wrapper: &[&str]) -> Server {
        Server::start_with(tag, bind, extra, wrapper, &[])
    }

    /// Start bound to `bind` with `extra` TOML, the command prefixed by
    /// `wrapper`, with `server_args` before the configuration.
    pub fn start_with(
        tag: &str,
        bind: &str,
        extra: &str,
        wrapper: &[&str],
        server_args: &[&str],
    ) -> Server {
        let port = free_port();
        let dir = temp_dir(tag);
        // Admission stays mandatory (the production default) with the
        // development plot size and stake unless a test sets its own.
        let admission = if extra.contains("[hypermesh_assets]") {
            ""
        } else {
            "[hypermesh_assets]\nplot_k = 12\ndevelopment_stake = 1\n"
        };
        let config = format!("[internet2]\nbind = \"{bind}\"\nport = {port}\n{admission}{extra}\n");
        Server::launch_file(port, dir, &config, bind, wrapper, server_args)
    }

    /// Start with the whole configuration file `config(port)`, on a fresh
    /// port; the file binds `bind`.
    pub fn start_file(
        tag: &str,
        bind: &str,
        config: impl Fn(u16) -> String,
        server_args: &[&str],
    ) -> Server {
        let port = free_port();
        Server::launch_file(port, temp_dir(tag), &config(port), bind, &[], server_args)
    }

    fn launch_file(
        port: u16,
        dir: PathBuf,
        config: &str,
        bind: &str,
        wrapper: &[&str],
        server_args: &[&str],
    ) -> Server {
        std::fs::write(dir.join("server.toml"), config).unwrap();
        if !wrapper.is_empty() {
            // The wrapper may drop privileges: let the server write its data dir.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let (child, stderr) = launch(&dir, bind, wrapper, server_args);
        Server {
            child: Some(child),
            port,
            dir,
            stderr,
        }
    }

    /// SIGKILL the server (no drain, no cleanup) and start it again with
    /// the same configuration and data directory (a `[::1]` server).
    pub fn kill9_and_restart(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
        let (child, stderr) = launch(&self.dir, "::1", &[], &[]);
        self.child = Some(child);
        self.stderr = stderr;
    }

    pub fn addr(&self) -> String {
        format!("[::1]:{}", self.port)
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, self.port, 0, 0))
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Stderr lines so far.
    pub fn log(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }

    /// Run the `internet2` client against this server.
    pub fn client(&self, args: &[&str]) -> std::process::Output {
        let mut command = Command::new(CLIENT);
        command.args(args);
        if !args.contains(&"--connect") {
            command.args(["--connect", &self.addr()]);
        }
        command.arg("--ca").arg(self.ca());
        command.output().expect("run internet2")
    }

    /// The server's counters through `internet2 stats --json`.
    pub fn stats(&self) -> serde_json::Value {
        self.try_stats().unwrap_or_else(|why| panic!("{why}"))
    }

    /// [`Self::stats`], or why the request failed (a test that polls the
    /// server while it is busy asks again).
    pub fn try_stats(&self) -> Result<serde_json::Value, String> {
        let out = self.client(&["stats", "--json"]);
        if !out.status.success() {
            return Err(format!(
                "stats failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("stats is not JSON: {e}"))
    }

    /// SIGTERM and wait up to `limit`; returns the exit status and how long it took.
    pub fn terminate(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let mut child = self.child.take().expect("running");
        let started = Instant::now();
        signal(child.id(), "TERM");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                panic!("server did not exit within {limit:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Poll `check` every `every` until it passes; past `limit`, fail with the
/// last reason it gave.
pub fn wait_until(limit: Duration, every: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(()) => return,
            Err(why) if Instant::now() >= deadline => panic!("after {limit:?}: {why}"),
            Err(_) => std::thread::sleep(every),
        }
    }
}

impl Server {
    /// `command` (the server binary, possibly behind a wrapper) as an
    /// operator command on this server's config and data directory.
    pub fn operator_command(&self, mut command: Command) -> Command {
        command
            .arg("--config")
            .arg(self.dir.join("server.toml"))
            .arg("--data-dir")
            .arg(&self.dir);
        command
    }

    /// `internet2-server ARGS` as the operator on this server's host (its
    /// config and data directory), as an operator runs `rotate`.
    pub fn admin(&self, args: &[&str]) -> std::process::Output {
        admin_in(&self.dir, args)
    }

    /// Wait until the server logs a line containing `needle`; the lines
    /// read meanwhile (which later [`Self::log`] calls no longer return),
    /// that one included.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) -> Vec<String> {
        let mut read = Vec::new();
        wait_until(limit, Duration::from_millis(50), || {
            read.extend(self.log());
            if read.iter().any(|l| l.contains(needle)) {
                Ok(())
            } else {
                Err(format!("the server never logged {needle:?}"))
            }
        });
        read
    }
}

/// `internet2-server ARGS` on the server whose config and data are in
/// `dir` (`dir/server.toml`), as its operator runs them.
pub fn admin_in(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(SERVER)
        .arg("--config")
        .arg(dir.join("server.toml"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

/// Run the server on `dir/server.toml` with data in `dir`; waits for the
/// `listening` line.
fn launch(
    dir: &Path,
    bind: &str,
    wrapper: &[&str],
    server_args: &[&str],
) -> (Child, mpsc::Receiver<String>) {
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(SERVER);
            c
        }
        None => Command::new(SERVER),
    };
    let mut child = command
        .args(server_args)
        .arg("--config")
        .arg(dir.join("server.toml"))
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start internet2-server");
    let (tx, stderr) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let out = child.stdout.take().unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = ready_tx.send(line);
        }
        for _ in lines {}
    });
    let line = ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server prints its listening line");
    assert!(
        line.starts_with(&format!("listening on [{bind}]:")),
        "unexpected first line: {line}"
    );
    (child, stderr)
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // KEEP_TEST_DIRS=1 keeps the server's data dir for a post-mortem.
        if std::env::var_os("KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

/// Parse a bench JSON result file.
pub fn read_json(path: &Path) -> serde_json::Value {
    let mut text = String::new();
    std::fs::File::open(path)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn ok(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "command failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The operator identity the server writes beside its CA (`operator.pem`).
pub fn operator_identity(server: &Server) -> dataplane::ClientIdentity {
    internet2_server::authority::load_identity(&server.dir.join("operator.pem")).unwrap()
}

/// The admission proofs of the operator identity (plot cached beside it).
pub fn operator_admitter(server: &Server) -> std::sync::Arc<dyn dataplane::admission::Admitter> {
    let path = server.dir.join("operator.pem");
    let identity = internet2_server::authority::load_identity(&path).unwrap();
    internet2_server::admission::admitter_for_file(&identity, &path).unwrap()
}

/// An identity issued as [`issue_identity`] does, given the stake
/// production asks for: its file, its serial and its identity (64 hex
/// digits, as quotas and grants name it).
pub fn staked_identity(server: &Server, name: &str) -> (PathBuf, String, String) {
    let (path, serial) = issue_identity(server, name);
    let granted = server
        .operator_command(Command::new(SERVER))
        .args(["stake", "grant", "--cert", path.to_str().unwrap()])
        .output()
        .unwrap();
    let out: serde_json::Value = serde_json::from_str(&ok(&granted)).expect("JSON");
    let identity = out["identity"].as_str().unwrap().to_owned();
    (path, serial, identity)
}

/// A client identity (chain + key PEM) issued by the server's CA through
/// the operator's `CERT_ISSUE` request; returns the file and the serial.
pub fn issue_identity(server: &Server, name: &str) -> (PathBuf, String) {
    issue_identity_for(server, name, None)
}

/// [`issue_identity`], valid `lifetime_hours` (None: the CA's default).
pub fn issue_identity_for(
    server: &Server,
    name: &str,
    lifetime_hours: Option<u32>,
) -> (PathBuf, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let request = serde_json::to_vec(&controlplane::authority::api::CertIssueRequest {
        csr_pem: csr,
        usage: controlplane::authority::api::CertUsage::Client,
        lifetime_hours,
    })
    .unwrap();
    let issued: controlplane::authority::api::Issued = serde_json::from_slice(&operator_rpc(
        server,
        controlplane::authority::api::CERT_ISSUE,
        &request,
    ))
    .unwrap();
    let path = server.dir.join(format!("{name}.pem"));
    std::fs::write(
        &path,
        format!(
            "{}{}{}",
            issued.certificate_pem,
            issued.chain_pem,
            key.serialize_pem()
        ),
    )
    .unwrap();
    (path, issued.serial)
}

/// One authority request as the operator; panics on an error answer.
pub fn operator_rpc(server: &Server, kind: u8, payload: &[u8]) -> bytes::Bytes {
    let target = operator_target(server);
    let config = target
        .client_config(dataplane::protocols::ALPN_STOQ)
        .unwrap();
    let outcome =
        dataplane::client::rpc_raw(&target, &config, kind, payload, Duration::from_secs(5))
            .unwrap();
    match &outcome.replies[0] {
        dataplane::client::rpc::Reply::Ok(body) => body.clone(),
        other => panic!("request {kind:#x} failed: {other:?}"),
    }
}

pub fn operator_target(server: &Server) -> dataplane::client::ClientTarget {
    let root = controlplane::authority::pem::load_cert(&server.ca()).unwrap();
    dataplane::client::ClientTarget {
        remote: server.socket_addr(),
        server_name: "localhost".into(),
        trust: dataplane::ServerTrust::Roots(vec![root]),
        identity: Some(operator_identity(server)),
        backend: dataplane::BackendKind::Socket,
        admitter: Some(operator_admitter(server)),
        transport: dataplane::TransportSettings::default(),
    }
}

/// A one-time enrollment token of `server`, minted from its data directory
/// as `internet2-server enroll-token` does.
pub fn enrollment_token(server: &Server) -> String {
    controlplane::authority::enrollment::mint(
        &server.dir,
        Duration::from_secs(600),
        std::time::SystemTime::now(),
    )
    .expect("mint a token")
}

/// The interop venv's python (aioquic and friends, installed by
/// `.ci/setup-interop.sh`), if it is there.
pub fn interop_python() -> Option<PathBuf> {
    let venv = std::env::var_os("INTEROP_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/interop-venv"));
    let python = venv.join("bin/python");
    python.exists().then_some(python)
}

/// An interop script of tests/interop/.
pub fn interop_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/interop")
        .join(name)
}

/// `python SCRIPT --host ::1 --port PORT --cafile CA`, aimed at `server`.
pub fn interop_peer(python: &Path, script: &str, server: &Server) -> Command {
    let mut command = Command::new(python);
    command
        .arg(interop_script(script))
        .args([
            "--host",
            "::1",
            "--port",
            &server.port.to_string(),
            "--cafile",
        ])
        .arg(server.ca());
    command
}

/// libfaketime for a multithreaded program, where Debian puts it.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// A wall clock for a server under libfaketime, offset by what its file
/// says (libfaketime's format, e.g. `+2h`, read again every second); the
/// monotonic clock is left alone, as an NTP step leaves it. The file's
/// directory goes when this does.
pub struct FakedClock {
    dir: PathBuf,
    file: PathBuf,
}

impl FakedClock {
    /// At offset zero; None where libfaketime is not installed.
    pub fn new(tag: &str) -> Option<FakedClock> {
        if !Path::new(LIBFAKETIME).exists() {
            return None;
        }
        let dir = temp_dir(tag);
        let file = dir.join("offset");
        let clock = FakedClock { dir, file };
        clock.set("+0s");
        Some(clock)
    }

    /// Step the clock to `offset` from the real time.
    pub fn set(&self, offset: &str) {
        std::fs::write(&self.file, format!("{offset}\n")).unwrap();
    }

    /// The `env` prefix (for [`Server::start_in`]) that runs a server on it.
    pub fn wrapper(&self) -> Vec<String> {
        vec![
            "env".into(),
            format!("LD_PRELOAD={LIBFAKETIME}"),
            format!("FAKETIME_TIMESTAMP_FILE={}", self.file.display()),
            "FAKETIME_CACHE_DURATION=1".into(),
            "FAKETIME_DONT_FAKE_MONOTONIC=1".into(),
        ]
    }
}

impl Drop for FakedClock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
