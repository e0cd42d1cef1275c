//! Redis and PostgreSQL servers of one test's own, on ports of their own, so that a
//! fault test can kill and restart them without disturbing the other tests.
//!
//! They need the server programs (`redis-server`; PostgreSQL's `initdb`, `pg_ctl`),
//! found on `PATH`, in `BOXOFFICE_TEST_PG_BIN`, or under `/usr/lib/postgresql/*/bin`.
//! Without them (a laptop with only Docker) the tests that need them say so and
//! skip, except where `BOXOFFICE_TEST_REQUIRE_SERVERS` or `CI` is set (`.ci/run`
//! sets the first): there they fail ([`servers_available`]).
//! PostgreSQL refuses to run as root, so as root its commands run as the `postgres`
//! user. Dropping a server stops it and removes its files.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::harness::redis_answers;

/// Whether this machine can run private servers. When it cannot: a panic where they
/// are required (CI must run every fault test), elsewhere a note on stderr and `false`.
pub fn servers_available() -> bool {
    let redis = Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let missing = match (redis, postgres_bin()) {
        (true, Some(_)) => return true,
        (false, Some(_)) => "redis-server",
        (true, None) => "PostgreSQL's initdb and pg_ctl",
        (false, None) => "redis-server and PostgreSQL's initdb and pg_ctl",
    };
    let message = format!(
        "this test starts and kills its own servers and needs {missing} \
         (Debian: apt-get install redis-server postgresql; or set BOXOFFICE_TEST_PG_BIN)"
    );
    let required = ["BOXOFFICE_TEST_REQUIRE_SERVERS", "CI"]
        .iter()
        .any(|var| std::env::var_os(var).is_some());
    assert!(!required, "{message}");
    // Past the test harness' output capture, so that a plain `cargo test` shows it.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {message}");
    false
}

/// No test on private servers may run longer than this, whatever breaks.
const TEST_LIMIT: Duration = Duration::from_secs(150);

/// Runs `test` with a time limit.
pub async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_LIMIT, test)
        .await
        .expect("fault test ran out of time")
}

/// Runs a test that starts its own servers, bounded, where it can (see
/// [`servers_available`]).
pub async fn on_private_servers(test: impl Future<Output = ()>) {
    if servers_available() {
        bounded(test).await;
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

pub fn scratch_dir(kind: &str) -> PathBuf {
    std::env::temp_dir().join(format!("boxoffice-{kind}-{}", Uuid::new_v4().simple()))
}

/// How a private Redis keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Append-only file, fsync before every reply: what the shipped deployments use.
    AofAlways,
    /// Only what `SAVE` writes to `dump.rdb`; read back at start.
    Snapshot,
}

pub struct PrivateRedis {
    port: u16,
    dir: PathBuf,
    persistence: Persistence,
    password: Option<String>,
    /// Runs in cluster mode, its cluster bus on this port, holding every slot
    /// itself: Redis then refuses, as a cluster does, a command or script whose keys
    /// hash to different slots. (The bus defaults to the port + 10,000, which is no
    /// port at all for a fifth of the ephemeral range.)
    cluster_port: Option<String>,
    child: Option<Child>,
}

impl PrivateRedis {
    pub async fn start(persistence: Persistence) -> Self {
        Self::start_with(persistence, None).await
    }

    /// A server that requires `password` (`requirepass`).
    pub async fn start_with(persistence: Persistence, password: Option<&str>) -> Self {
        let dir = scratch_dir("redis");
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Self {
            port: free_port(),
            dir,
            persistence,
            password: password.map(str::to_owned),
            cluster_port: None,
            child: None,
        };
        redis.restart().await;
        redis
    }

    /// A node in cluster mode that belongs to no cluster yet.
    pub async fn cluster_node() -> Self {
        let dir = scratch_dir("redis");
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Self {
            port: free_port(),
            dir,
            persistence: Persistence::Snapshot,
            password: None,
            cluster_port: Some(free_port().to_string()),
            child: None,
        };
        redis.restart().await;
        redis
    }

    /// A cluster of one node that serves every slot.
    pub async fn cluster_of_one() -> Self {
        let redis = Self::cluster_node().await;
        let mut conn = redis::Client::open(redis.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(0)
            .arg(16383)
            .query_async(&mut conn)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut conn)
                .await
                .unwrap();
            if info.contains("cluster_state:ok") {
                return redis;
            }
            assert!(Instant::now() < deadline, "the cluster did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts the server (again) on the same port and files; returns once it answers.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "Redis is already running");
        let port = self.port.to_string();
        let mut args = vec![
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--logfile",
            "redis.log",
        ];
        args.extend(match self.persistence {
            Persistence::AofAlways => ["--appendonly", "yes", "--appendfsync", "always"],
            Persistence::Snapshot => ["--appendonly", "no", "--appendfsync", "no"],
        });
        if let Some(password) = &self.password {
            args.extend(["--requirepass", password]);
        }
        if let Some(bus) = &self.cluster_port {
            args.extend(["--cluster-enabled", "yes", "--cluster-port", bus]);
            args.extend(["--cluster-config-file", "nodes.conf"]);
            // A master that fails is replaced within seconds, and the other masters'
            // slots go on answering meanwhile.
            args.extend(["--cluster-node-timeout", "1000"]);
            args.extend(["--cluster-require-full-coverage", "no"]);
            // A node back as a replica is in sync at once, not after the 5 s Redis
            // waits by default for more replicas to share the transfer.
            args.extend(["--repl-diskless-sync-delay", "0"]);
        }
        let child = Command::new("redis-server")
            .args(&args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .spawn()
            .expect("redis-server runs (install Redis: apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis_answers(&self.url()).await {
            assert!(
                Instant::now() < deadline,
                "private Redis did not answer; see {}",
                self.dir.join("redis.log").display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Deletes what the stopped server keeps on disk: its next start is empty.
    pub fn wipe(&self) {
        assert!(self.child.is_none(), "stop Redis before wiping it");
        let _ = std::fs::remove_file(self.dir.join("dump.rdb"));
        let _ = std::fs::remove_dir_all(self.dir.join("appendonlydir"));
    }

    /// SIGSTOP (`false`) or SIGCONT (`true`): a server that stalls, then goes on.
    pub fn run(&self, on: bool) {
        let pid = self.child.as_ref().expect("Redis is running").id();
        let signal = if on { "-CONT" } else { "-STOP" };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// SIGKILL: the server stops at once, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct PrivatePostgres {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

impl PrivatePostgres {
    /// Creates a cluster in a scratch directory and starts it.
    pub fn start() -> Self {
        let postgres = Self {
            port: free_port(),
            dir: scratch_dir("postgres"),
            bin: postgres_bin().expect("PostgreSQL server programs (see servers_available)"),
        };
        postgres.run(
            "initdb",
            &[
                "--pgdata",
                path_str(&postgres.dir),
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
        );
        postgres.resume();
        postgres
    }

    /// The server URL without a database, as `TestEnv` takes it.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Stops the server (fast shutdown: connections are cut, nothing is lost).
    pub fn stop(&self) {
        self.pg_ctl(&["stop", "--mode=fast"]);
    }

    /// Starts the stopped server again; returns once it accepts connections.
    pub fn resume(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            path_str(&self.dir)
        );
        let log = self.dir.join("server.log");
        self.pg_ctl(&["start", "-o", &options, "-l", path_str(&log)]);
    }

    fn pg_ctl(&self, args: &[&str]) {
        let mut all = vec!["--pgdata", path_str(&self.dir), "--wait", "--silent"];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all);
    }

    fn run(&self, program: &str, args: &[&str]) {
        let output = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// One of PostgreSQL's programs, run as `postgres` when this process is root.
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        let mut command = if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        command.stdin(Stdio::null());
        command
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["--pgdata", path_str(&self.dir), "stop", "--mode=immediate"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("scratch paths are UTF-8")
}

fn running_as_root() -> bool {
    static ROOT: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
    });
    *ROOT
}

/// Where PostgreSQL's server programs are.
fn postgres_bin() -> Option<PathBuf> {
    if let Ok(bin) = std::env::var("BOXOFFICE_TEST_PG_BIN") {
        let bin = PathBuf::from(bin);
        return bin.join("initdb").exists().then_some(bin);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if bin.join("initdb").exists() {
            return Some(bin);
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop()
}
