//! The `kalandra-server` binary as a child process on loopback, for tests of
//! what an operator sees: exit codes, standard output and error, `/metrics`.
#![allow(dead_code, missing_docs)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longest wait for the server to start or stop.
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(60);
const RESPONSE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// The server binary with loopback listeners on free ports and `data_dir`.
pub fn command(data_dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kalandra-server"));
    command
        .env_clear()
        .env("KALANDRA_DATA_DIR", data_dir)
        .env("KALANDRA_LISTEN", "127.0.0.1:0")
        .env("KALANDRA_ADMIN_LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null());
    command
}

/// A running server; killed (SIGKILL) when dropped.
pub struct ServerProcess {
    pub child: Child,
    pub admin: SocketAddr,
    pub quic: SocketAddr,
    pub stdout: Vec<String>,
    pub stderr_path: PathBuf,
    lines: mpsc::Receiver<String>,
}

impl ServerProcess {
    /// Starts `command` and waits for its "listening on" line.
    pub fn start(mut command: Command, stderr_path: &Path) -> ServerProcess {
        let stderr = std::fs::File::create(stderr_path).expect("stderr file");
        let mut child = command.stdout(Stdio::piped()).stderr(stderr).spawn().expect("spawn kalandra-server");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match lines.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let stderr = std::fs::read_to_string(stderr_path).unwrap_or_default();
                    panic!("server did not start; stdout {seen:?}, stderr:\n{stderr}");
                }
            };
            seen.push(line.clone());
            if let Some(rest) = line.strip_prefix("listening on quic://") {
                let (quic, admin) = rest.split_once(" (admin http://").expect("listening line");
                let admin = admin.trim_end_matches(')');
                return ServerProcess {
                    child,
                    admin: admin.parse().expect("admin address"),
                    quic: quic.parse().expect("quic address"),
                    stdout: seen,
                    stderr_path: stderr_path.to_owned(),
                    lines,
                };
            }
        }
    }

    /// Sends `signal` (e.g. "HUP", "TERM") with `kill(1)`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill -{signal}");
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> ExitStatus {
        wait_with_timeout(&mut self.child)
    }

    /// Standard output lines printed after the start, waiting up to `wait`.
    pub fn more_stdout(&mut self, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        while let Ok(line) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            self.stdout.push(line);
        }
        self.stdout.clone()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `child` to exit, killing it after [`PROCESS_TIMEOUT`].
pub fn wait_with_timeout(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `command` to completion: exit status, stdout, stderr.
pub fn run(mut command: Command) -> (ExitStatus, String, String) {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = wait_with_timeout(&mut child);
    (status, out.join().expect("stdout"), err.join().expect("stderr"))
}

/// One HTTP/1.1 GET with `Connection: close`: status, head, body.
pub fn http_get(address: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(PROCESS_TIMEOUT)).expect("timeout");
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("write");
    let mut raw = Vec::new();
    stream.take(RESPONSE_BYTES_MAX).read_to_end(&mut raw).expect("read");
    let text = String::from_utf8(raw).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let status = head.split(' ').nth(1).expect("status").parse().expect("numeric status");
    (status, head.to_owned(), dechunk(head, body))
}

fn dechunk(head: &str, body: &str) -> String {
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return body.to_owned();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if size == 0 {
            break;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    out
}
