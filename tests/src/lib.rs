//! End-to-end test helpers: `TestServer` starts the real `tandem serve` as a process on
//! 127.0.0.1:0 with its own data dir, reads the bound address from its stdout, mints
//! tokens with its secret, and can SIGTERM, SIGKILL and restart it on the same data dir.
//! Helpers wait by polling with a deadline, never by sleeping a fixed time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tandem_client::Connection;
use tandem_protocol::ServerFrame;

pub mod cluster;
pub mod hook;
pub mod http;
pub mod proxy;
pub mod raw;
pub mod trigger;
pub mod webhook;
pub mod wsproxy;

pub use tandem_client;
pub use tandem_protocol;

/// The HS256 secret every test server uses unless a test configures keys itself.
pub const SECRET: &str = "e2e-test-secret-0123456789abcdef0123456789abcdef";

/// The gateway's key fixtures (RSA and EC key pairs).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/tandem-gateway/tests/fixtures")
        .join(name)
}

pub struct TestServer {
    child: Option<Child>,
    pub addr: SocketAddr,
    data_dir: tempfile::TempDir,
    args: Vec<String>,
    stderr: Option<PathBuf>,
}

#[derive(Debug, Default)]
pub struct TestServerBuilder {
    args: Vec<String>,
    no_secret: bool,
    data_dir: Option<tempfile::TempDir>,
    stderr: Option<PathBuf>,
}

impl TestServerBuilder {
    /// Adds `--name value` to the command line.
    pub fn arg(mut self, name: &str, value: impl ToString) -> Self {
        self.args.push(name.to_owned());
        self.args.push(value.to_string());
        self
    }

    /// Starts without `--jwt-secret` (the test passes its own keys, or none).
    pub fn without_secret(mut self) -> Self {
        self.no_secret = true;
        self
    }

    /// Sends the server's stderr (its log) to `path` instead of the data dir's log file:
    /// `/dev/full`, say, for a log that cannot be written. [`TestServer::log`] then reads
    /// nothing.
    pub fn stderr(mut self, path: impl Into<PathBuf>) -> Self {
        self.stderr = Some(path.into());
        self
    }

    /// The log file the server will write, known before `start` so that a test can watch a
    /// start that takes a while.
    pub fn log_path(&mut self) -> PathBuf {
        log_file(
            self.data_dir
                .get_or_insert_with(|| tempfile::tempdir().expect("temp dir"))
                .path(),
        )
    }

    pub fn start(self) -> TestServer {
        let data_dir = self
            .data_dir
            .unwrap_or_else(|| tempfile::tempdir().expect("temp dir"));
        let mut args = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()];
        if !self.no_secret {
            args.push("--jwt-secret".to_owned());
            args.push(SECRET.to_owned());
        }
        args.extend(self.args);
        let mut server = TestServer {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir,
            args,
            stderr: self.stderr,
        };
        server.spawn();
        server
    }
}

/// The `tandem` binary: Cargo builds it for this package as `tandem-e2e-server`, next to
/// the `deps/` folder the test executables run from. `TANDEM_BIN` overrides it.
pub fn tandem_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("TANDEM_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("deps dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("target dir")
    } else {
        dir
    };
    dir.join(format!("tandem-e2e-server{}", std::env::consts::EXE_SUFFIX))
}

impl TestServer {
    pub fn builder() -> TestServerBuilder {
        TestServerBuilder::default()
    }

    pub fn start() -> TestServer {
        TestServer::builder().start()
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(
                self.stderr
                    .clone()
                    .unwrap_or_else(|| log_file(self.data_dir.path())),
            )
            .expect("log file");
        let mut child = Command::new(tandem_bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .args(&self.args)
            .env("RUST_LOG", "info,tandem_gateway=debug")
            .env_remove("TANDEM_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start tandem");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("tandem listening on ") {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("tandem did not start; log:\n{}", self.log());
            });
        self.addr = addr.parse().expect("listen address");
        self.child = Some(child);
    }

    /// The server's log so far (stderr), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(log_file(self.data_dir.path())).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("ws://{}/v1/sync", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn token(&self, sub: &str) -> String {
        tandem_token::mint_hs256(
            SECRET.as_bytes(),
            sub,
            Duration::from_secs(3600),
            None,
            None,
        )
        .expect("mint token")
    }

    /// A connected, authenticated client for `sub`.
    pub async fn connect(&self, sub: &str) -> Connection {
        Connection::connect(&self.url(), &self.token(sub))
            .await
            .unwrap_or_else(|e| panic!("connect as {sub}: {e}"))
    }

    /// SIGKILL: no shutdown at all.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the process to exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        self.send_sigterm();
        self.wait_exit()
    }

    /// Starts the server again on the same data dir, settings and port (clients that
    /// reconnect find it where it was).
    pub fn restart(&mut self) {
        self.kill();
        self.start_again();
    }

    /// Adds `--name value` for the next `start_again`.
    pub fn add_arg(&mut self, name: &str, value: impl ToString) {
        self.args.push(name.to_owned());
        self.args.push(value.to_string());
    }

    /// Starts a killed or terminated server again on the same data dir, settings and port.
    pub fn start_again(&mut self) {
        if let Some(i) = self.args.iter().position(|a| a == "--listen") {
            self.args[i + 1] = self.addr.to_string();
        }
        self.spawn();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where a server started in `data_dir` writes its log (stderr).
fn log_file(data_dir: &Path) -> PathBuf {
    data_dir.join("server.log")
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `done` until it is true, or panics with `what` after `timeout`.
pub async fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    eventually(timeout, what, || std::future::ready(done().then_some(()))).await;
}

/// Waits for the next live `dataset` push on `conn` and returns (sync count, records).
pub async fn next_push(conn: &mut Connection) -> (u64, Vec<tandem_protocol::Record>) {
    loop {
        match conn.next_event_timeout(Duration::from_secs(10)).await {
            Some(ServerFrame::Dataset {
                sync_count,
                records,
                ..
            }) => return (sync_count, records),
            Some(_) => continue,
            None => panic!("no push arrived"),
        }
    }
}

/// Reads pushes until one at `sync_count` or later arrives; returns its records.
pub async fn push_at_least(
    conn: &mut Connection,
    sync_count: u64,
) -> (u64, Vec<tandem_protocol::Record>) {
    loop {
        let (n, records) = next_push(conn).await;
        if n >= sync_count {
            return (n, records);
        }
    }
}

/// A plain HTTP GET on loopback; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
}

/// [`http_get`], with an error where nothing answers (the listener is gone).
pub async fn try_http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A GET on loopback with more headers (a `Host` among them replaces the default); returns
/// (status, body). Reads the head and a `Content-Length` body without waiting for the
/// connection to close, so it also takes the answer to a WebSocket upgrade (101, no body).
pub async fn http_get_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = format!("GET {path} HTTP/1.1\r\n");
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut read = async |buf: &mut Vec<u8>| {
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut chunk))
            .await
            .expect("an answer in time")
            .expect("read");
        buf.extend_from_slice(&chunk[..n]);
        n > 0
    };
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        assert!(read(&mut buf).await, "no complete answer: {buf:?}");
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < end + length && read(&mut buf).await {}
    (status, String::from_utf8_lossy(&buf[end..]).into_owned())
}

/// One value from the node's `/metrics`, by its full name with labels (`name{…}`).
pub async fn metric(server: &TestServer, name: &str) -> u64 {
    let (status, body) = http_get(server.addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("{name} missing:\n{body}"))
}

/// Now, in unix seconds (for claims).
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl TestServer {
    /// The server process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM and returns at once; [`TestServer::wait_exit`] waits for the exit.
    pub fn send_sigterm(&self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
        }
    }

    /// Waits up to 30 s for the process to exit (killing it then); returns whether it
    /// exited successfully.
    pub fn wait_exit(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `tandem serve` on a free loopback port with the test secret in `data_dir`, for tests that
/// watch the process start (or refuse to) rather than use a started server.
pub fn serve_command(data_dir: &Path) -> Command {
    let mut command = Command::new(tandem_bin());
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--jwt-secret", SECRET])
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("TANDEM_CONFIG");
    command
}

/// Runs `command` to its exit with its output captured, or kills it after `timeout` and
/// returns `None` (a server that should have refused to start and did not).
pub fn output_within(command: &mut Command, timeout: Duration) -> Option<std::process::Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tandem");
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return Some(child.wait_with_output().expect("output"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl TestServerBuilder {
    /// Runs the server in `dir` (a test that needs the data dir on a particular file system,
    /// such as a small tmpfs).
    pub fn data_dir(mut self, dir: tempfile::TempDir) -> Self {
        self.data_dir = Some(dir);
        self
    }
}

/// The status of a GET on loopback, or `None` when nothing answers within a second (the
/// node is down or stopped): for watching a node that a test kills and restarts.
pub async fn try_http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(request.as_bytes()).await.ok()?;
        // The status line is all that is needed.
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(1), exchange)
        .await
        .ok()
        .flatten()
}
