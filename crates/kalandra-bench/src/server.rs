//! The server under test: a `kalandra-server` process the generator starts
//! on loopback with a temporary data directory, or one already running.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::limits::{SERVER_STARTUP_TIMEOUT_MS, SERVER_STOP_TIMEOUT_MS};
use crate::BenchError;

/// Where the server is and how to trust it.
#[derive(Debug, Clone)]
pub struct ServerTarget {
    /// Its QUIC address.
    pub address: SocketAddr,
    /// SHA-256 fingerprint of its certificate.
    pub fingerprint: [u8; 32],
    /// Its process id, when known: memory and CPU time are read from `/proc`.
    pub pid: Option<u32>,
}

/// Limits the generator configures on a server it starts: rate limits out
/// of the way (the run measures sequencing, storage and transport), and
/// room for every connection of the largest scenario from one address.
pub const BENCH_SERVER_CONFIG: &str = "[limits]\n\
    frames_per_second_per_connection = 10000000\n\
    frames_burst_per_connection = 10000000\n\
    frames_per_second_per_user = 10000000\n\
    frames_burst_per_user = 10000000\n\
    connections_per_address_max = 200000\n\
    rooms_per_user_max = 100000\n\
    handshake_timeout_ms = 60000\n\
    idle_timeout_ms = 120000\n\
    drain_timeout_ms = 5000\n";

/// Environment variables the server reads that would override the generator's flags.
const SERVER_ENVIRONMENT: [&str; 6] = [
    "KALANDRA_CONFIG",
    "KALANDRA_DATA_DIR",
    "KALANDRA_LISTEN",
    "KALANDRA_ADMIN_LISTEN",
    "KALANDRA_LOG_FORMAT",
    "KALANDRA_LOG",
];

/// A server process started by the generator; stopped (SIGTERM, then
/// SIGKILL) when dropped or by [`ServerProcess::stop`].
pub struct ServerProcess {
    child: Child,
    binary: PathBuf,
    /// Where it listens and its fingerprint.
    pub target: ServerTarget,
    /// Keeps the temporary data directory (unless one was given).
    _data_dir: Option<tempfile::TempDir>,
    /// The server-to-server listener's address, when federation is configured.
    pub federation_address: Option<SocketAddr>,
    /// The admin HTTP listener's address (health, metrics).
    pub admin_address: Option<SocketAddr>,
    /// The directory holding its configuration, data and log.
    dir: PathBuf,
}

/// What a started server is configured with beyond [`BENCH_SERVER_CONFIG`].
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// The server's domain (top-level `domain`); the server's default when absent.
    pub domain: Option<String>,
    /// TOML tables appended after [`BENCH_SERVER_CONFIG`] (`[federation]` and its peers).
    pub extra_config: String,
    /// The federation key's seed, written to `federation-signing.key` in the
    /// data directory before the start (peers are configured with its public key).
    pub federation_key_seed: Option<[u8; 32]>,
}

/// The server binary next to this executable (`kalandra-server` in the
/// same target directory), if there is one.
pub fn default_server_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // Test executables live one level deeper, in `deps/`.
    [dir.join("kalandra-server"), dir.parent()?.join("kalandra-server")]
        .into_iter()
        .find(|path| path.is_file())
}

impl ServerProcess {
    /// Starts `binary` listening on a free loopback port, with its data in
    /// `data_dir` (or a fresh temporary directory), and waits until it
    /// prints its address. Blocking.
    pub fn start(binary: &Path, data_dir: Option<&Path>) -> Result<ServerProcess, BenchError> {
        ServerProcess::start_with(binary, data_dir, &ServerOptions::default())
    }

    /// [`ServerProcess::start`] with `options` (domain, federation tables
    /// and key). A server with a federation listener reports its address in
    /// [`ServerProcess::federation_address`]. Blocking.
    pub fn start_with(
        binary: &Path,
        data_dir: Option<&Path>,
        options: &ServerOptions,
    ) -> Result<ServerProcess, BenchError> {
        let fail = |detail: String| BenchError::ServerStart { path: binary.to_owned(), detail };
        let (temp, dir) = match data_dir {
            Some(dir) => (None, dir.to_owned()),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("kalandra-bench-")
                    .tempdir()
                    .map_err(|e| fail(format!("temporary directory: {e}")))?;
                let dir = temp.path().to_owned();
                (Some(temp), dir)
            }
        };
        std::fs::create_dir_all(&dir).map_err(|e| fail(format!("data directory {}: {e}", dir.display())))?;
        let config = dir.join("kalandra-bench.toml");
        // Top-level keys come before the first table.
        let text = match &options.domain {
            Some(domain) => format!("domain = \"{domain}\"\n{BENCH_SERVER_CONFIG}{}", options.extra_config),
            None => format!("{BENCH_SERVER_CONFIG}{}", options.extra_config),
        };
        std::fs::write(&config, text).map_err(|e| fail(format!("writing the config: {e}")))?;
        if let Some(seed) = options.federation_key_seed {
            write_key_file(&dir.join("data"), &seed)
                .map_err(|e| fail(format!("writing the federation key: {e}")))?;
        }
        let (child, lines) = spawn(binary, &dir)?;
        let mut process = ServerProcess {
            child,
            binary: binary.to_owned(),
            target: ServerTarget {
                address: SocketAddr::from(([127, 0, 0, 1], 0)),
                fingerprint: [0; 32],
                pid: None,
            },
            _data_dir: temp,
            dir,
            federation_address: None,
            admin_address: None,
        };
        process.wait_listening(&lines)?;
        Ok(process)
    }

    /// Stops the server and keeps its data directory for [`ServerProcess::start_again`]. Blocking.
    pub fn pause(&mut self) -> Result<(), BenchError> {
        self.terminate()
    }

    /// Starts a server stopped by [`ServerProcess::pause`] again. Blocking.
    pub fn start_again(&mut self) -> Result<(), BenchError> {
        let (child, lines) = spawn(&self.binary, &self.dir)?;
        self.child = child;
        self.wait_listening(&lines)
    }

    /// Reads the server's first lines until it prints its address.
    fn wait_listening(&mut self, lines: &mpsc::Receiver<String>) -> Result<(), BenchError> {
        let fail = |detail: String| BenchError::ServerStart { path: self.binary.clone(), detail };
        let deadline = Instant::now() + Duration::from_millis(SERVER_STARTUP_TIMEOUT_MS);
        let mut fingerprint = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let line = match lines.recv_timeout(remaining) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(fail(format!("it did not listen within {SERVER_STARTUP_TIMEOUT_MS} ms")))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                    return Err(fail(format!("it exited before listening ({status}): {}", self.log_tail())));
                }
            };
            if let Some(hex) = line.strip_prefix("certificate fingerprint (sha256): ") {
                fingerprint = client_core::connection::parse_fingerprint(hex.trim());
            } else if let Some(rest) = line.strip_prefix("federation links on quic://") {
                self.federation_address = rest.split(' ').next().and_then(|a| a.parse().ok());
            } else if let Some(rest) = line.strip_prefix("listening on quic://") {
                let address = rest
                    .split(' ')
                    .next()
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| fail(format!("unreadable address line: {line}")))?;
                self.admin_address = rest
                    .split("(admin http://")
                    .nth(1)
                    .and_then(|tail| tail.trim_end_matches(')').parse().ok());
                let fingerprint =
                    fingerprint.ok_or_else(|| fail("no fingerprint printed before the address".into()))?;
                self.target = ServerTarget { address, fingerprint, pid: Some(self.child.id()) };
                return Ok(());
            }
        }
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join(SERVER_LOG_FILE)).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops the server: SIGTERM, then SIGKILL after [`SERVER_STOP_TIMEOUT_MS`]. Blocking.
    pub fn stop(mut self) -> Result<(), BenchError> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<(), BenchError> {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return Ok(());
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").arg("-TERM").arg(&pid).status();
        let deadline = Instant::now() + Duration::from_millis(SERVER_STOP_TIMEOUT_MS);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Err(BenchError::ServerStart {
            path: self.binary.clone(),
            detail: format!("it did not stop within {SERVER_STOP_TIMEOUT_MS} ms of SIGTERM and was killed"),
        })
    }
}

/// The server's log, in its directory (appended to across restarts).
const SERVER_LOG_FILE: &str = "server.log";

/// Starts the server whose configuration is in `dir` (data in `dir/data`,
/// log in [`SERVER_LOG_FILE`]); its stdout lines come on the receiver.
fn spawn(binary: &Path, dir: &Path) -> Result<(Child, mpsc::Receiver<String>), BenchError> {
    let fail = |detail: String| BenchError::ServerStart { path: binary.to_owned(), detail };
    let log_path = dir.join(SERVER_LOG_FILE);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| fail(format!("log file: {e}")))?;
    let mut command = Command::new(binary);
    command
        .arg("--config")
        .arg(dir.join("kalandra-bench.toml"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--admin-listen")
        .arg("127.0.0.1:0")
        .arg("--log-format")
        .arg("text")
        .arg("--log-filter")
        .arg("warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    for variable in SERVER_ENVIRONMENT {
        command.env_remove(variable);
    }
    let mut child = command.spawn().map_err(|e| fail(e.to_string()))?;
    let stdout = child.stdout.take().ok_or_else(|| fail("no stdout".into()))?;
    let (lines_in, lines) = mpsc::channel::<String>();
    // Drains stdout for the life of the process.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = lines_in.send(line);
        }
    });
    Ok((child, lines))
}

/// Writes `seed` as the server's federation key file (owner-only, as the server creates it).
fn write_key_file(data_dir: &Path, seed: &[u8; 32]) -> std::io::Result<()> {
    use std::io::Write as _;
    std::fs::create_dir_all(data_dir)?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(data_dir.join(FEDERATION_KEY_FILE_NAME))?;
    file.write_all(seed)?;
    file.sync_all()
}

/// The federation key's file name in a server's data directory.
pub const FEDERATION_KEY_FILE_NAME: &str = "federation-signing.key";

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}
