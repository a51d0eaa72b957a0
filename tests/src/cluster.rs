//! Multi-node helpers: a fresh PostgreSQL schema or database per test, a private
//! `redis-server` that a test may kill and restart, and several `tandem` nodes sharing them.

use crate::TestServer;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The PostgreSQL server tests use (trust auth on loopback).
pub fn pg_base_url() -> String {
    std::env::var("TANDEM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The shared Redis tests use unless they need their own.
pub fn redis_url() -> String {
    std::env::var("TANDEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A name unique to this test run: process id, a counter, the clock.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{}_{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs one SQL statement with `psql` against `url`.
pub fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .arg(url)
        .args(["-v", "ON_ERROR_STOP=1", "-tA", "-c", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql `{sql}`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A database of its own, dropped (with its connections) at the end.
pub struct PgDatabase {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl PgDatabase {
    pub fn create() -> PgDatabase {
        let admin_url = pg_base_url();
        let name = unique("tandem_e2e");
        psql(&admin_url, &format!("CREATE DATABASE {name}"));
        let url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("postgres url without a database: {admin_url}"),
        };
        PgDatabase {
            name,
            url,
            admin_url,
        }
    }

    /// Refuses new connections and ends the existing ones: the database is unreachable.
    pub fn cut_off(&self) {
        psql(
            &self.admin_url,
            &format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", self.name),
        );
        psql(
            &self.admin_url,
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{}'",
                self.name
            ),
        );
    }

    pub fn restore(&self) {
        psql(
            &self.admin_url,
            &format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", self.name),
        );
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .arg(&self.admin_url)
            .args([
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A schema of its own in the shared test database, dropped at the end.
pub struct PgSchema {
    pub name: String,
    pub url: String,
}

impl PgSchema {
    pub fn create() -> PgSchema {
        PgSchema {
            name: unique("tandem_e2e"),
            url: pg_base_url(),
        }
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .arg(&self.url)
            .args([
                "-c",
                &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A private `redis-server` on a free port, which a test may kill and restart.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut server = RedisServer { port, child: None };
        server.start_again();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn start_again(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` tandem nodes sharing one PostgreSQL schema and one Redis (under a fresh prefix).
pub fn start_nodes(n: usize, store_url: &str, schema: &str, redis_url: &str) -> Vec<TestServer> {
    let prefix = unique("tandem-e2e");
    (0..n)
        .map(|_| {
            TestServer::builder()
                .arg("--store", store_url)
                .arg("--postgres-schema", schema)
                .arg("--postgres-pool-size", 4)
                .arg("--redis", redis_url)
                .arg("--redis-prefix", &prefix)
                .start()
        })
        .collect()
}

impl RedisServer {
    /// The process id, for signals the test sends itself (`None` after `kill`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGSTOP: the process keeps its sockets open and answers nothing (a hung Redis, not a
    /// dead one).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("redis-server is running");
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }
}
