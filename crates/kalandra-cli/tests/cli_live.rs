//! `kalandra chat` and one device used by several commands at once: while
//! `chat` or `tail` runs, `send`, `history`, `whoami` and `room list` on the
//! same device go through it; a stopped or killed one leaves the device
//! usable.

mod common;

use std::io::{BufRead as _, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{kalandra, ok, Server};

const WAIT: Duration = Duration::from_secs(20);

/// A running `kalandra` whose standard output is collected line by line.
struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Running {
    fn start(dir: &Path, args: &[&str]) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kalandra"))
            .arg("--dir")
            .arg(dir)
            .args(args)
            .env_remove("KALANDRA_STORE_KEY")
            .env_remove("KALANDRA_CLIENT_DIR")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let collected = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                collected.lock().unwrap().push(line);
            }
        });
        Running { child, lines }
    }

    /// Waits until a printed line ends with `suffix`.
    async fn wait_for(&self, suffix: &str) {
        let started = Instant::now();
        while !self.lines.lock().unwrap().iter().any(|line| line.ends_with(suffix)) {
            assert!(
                started.elapsed() < WAIT,
                "no line ending {suffix:?} in {:?}",
                self.lines.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn type_line(&mut self, text: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{text}").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the process to exit; its exit code.
    async fn exit_code(mut self) -> Option<i32> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(started.elapsed() < WAIT, "still running");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn socket(dir: &Path) -> std::path::PathBuf {
    dir.join("kalandra.sock")
}

async fn wait_for_socket(dir: &Path) {
    let started = Instant::now();
    while !socket(dir).exists() {
        assert!(started.elapsed() < WAIT, "the running command does not serve the device");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Alice and Bob in one room; returns the room.
async fn two_in_a_room(server: &Server, alice: &Path, bob: &Path) -> String {
    let address = server.address.to_string();
    for dir in [alice, bob] {
        ok(dir, &["init", "--server", &address, "--fingerprint", &server.fingerprint_hex]).await;
    }
    let bob_id = ok(bob, &["whoami"]).await.trim().to_owned();
    let room = ok(alice, &["room", "create"]).await.trim().to_owned();
    ok(alice, &["invite", "--room", &room, &bob_id]).await;
    ok(bob, &["join", "--room", &room]).await;
    room
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_shows_and_sends_while_other_commands_use_the_same_device() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let (alice, bob) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (alice, bob) = (alice.path(), bob.path());
    let room = two_in_a_room(&server, alice, bob).await;
    let bob_id = ok(bob, &["whoami"]).await.trim().to_owned();

    let mut chat = Running::start(bob, &["chat", "--room", &room]);
    wait_for_socket(bob).await;
    ok(alice, &["send", "--room", &room, "hello bob"]).await;
    chat.wait_for("\thello bob").await;
    chat.type_line("hi alice, from the chat");
    chat.wait_for(&format!("{bob_id}\thi alice, from the chat")).await;

    // The same device, from other commands, while the chat runs.
    assert_eq!(ok(bob, &["whoami"]).await.trim(), bob_id);
    assert!(ok(bob, &["room", "list"]).await.contains(&room));
    let index = ok(bob, &["send", "--room", &room, "and from another command"]).await;
    assert!(index.trim().parse::<u64>().is_ok(), "{index}");
    chat.wait_for("\tand from another command").await;
    let history = ok(bob, &["history", "--room", &room]).await;
    assert!(history.contains("\thello bob") && history.contains("\tand from another command"), "{history}");
    assert!(ok(bob, &["history", "--room", &room, "--offline"]).await.contains("\thi alice, from the chat"));
    // A forwarded failure keeps its message and exit code.
    let unknown = kalandra(bob, &["send", "--room", &"0".repeat(32), "nowhere"]).await;
    assert_eq!(unknown.status.code(), Some(5), "{}", String::from_utf8_lossy(&unknown.stderr));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown to this device"));
    // Commands that are not handed over say why they cannot run.
    let busy = kalandra(bob, &["update", "--room", &room]).await;
    assert_eq!(busy.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("in use by another kalandra command"), "{busy:?}");

    // Each line is printed once, in log order.
    let lines = chat.lines.lock().unwrap().clone();
    for text in ["\thello bob", "\thi alice, from the chat", "\tand from another command"] {
        assert_eq!(lines.iter().filter(|line| line.ends_with(text)).count(), 1, "{lines:?}");
    }
    let indices: Vec<u64> =
        lines.iter().map(|line| line.split('\t').next().unwrap().parse().unwrap()).collect();
    assert!(indices.windows(2).all(|pair| pair[0] < pair[1]), "{lines:?}");

    // Ctrl-D: a clean exit that takes the socket with it.
    drop(chat.child.stdin.take());
    assert_eq!(chat.exit_code().await, Some(0));
    assert!(!socket(bob).exists());
    let alice_history = ok(alice, &["history", "--room", &room]).await;
    assert!(alice_history.contains(&format!("{bob_id}\thi alice, from the chat")), "{alice_history}");
    assert!(alice_history.contains(&format!("{bob_id}\tand from another command")), "{alice_history}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_stops_cleanly_on_sigint_and_a_killed_one_leaves_the_device_usable() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let (alice, bob) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (alice, bob) = (alice.path(), bob.path());
    let room = two_in_a_room(&server, alice, bob).await;

    // Bob replies while his tail runs (the README's demo).
    let tail = Running::start(bob, &["tail", "--room", &room]);
    wait_for_socket(bob).await;
    ok(alice, &["send", "--room", &room, "hello, Bob"]).await;
    tail.wait_for("\thello, Bob").await;
    ok(bob, &["send", "--room", &room, "hello, Alice"]).await;
    tail.wait_for("\thello, Alice").await;
    let interrupted = Command::new("kill").args(["-INT", &tail.child.id().to_string()]).status().unwrap();
    assert!(interrupted.success());
    assert_eq!(tail.exit_code().await, Some(0), "SIGINT is a clean exit");
    assert!(!socket(bob).exists());

    // A killed tail leaves its socket behind; the device still works.
    let mut tail = Running::start(bob, &["tail", "--room", &room]);
    wait_for_socket(bob).await;
    tail.child.kill().unwrap();
    tail.child.wait().unwrap();
    assert!(socket(bob).exists(), "a killed command cannot remove its socket");
    ok(bob, &["send", "--room", &room, "after the kill"]).await;
    assert!(ok(alice, &["history", "--room", &room]).await.contains("\tafter the kill"));
    server.stop().await;
}

/// `tmux -L <socket> <args>`, on a tmux server of this test's own.
fn tmux(socket: &str, args: &[&str]) -> String {
    let output = Command::new("tmux").arg("-L").arg(socket).args(args).output().expect("tmux is installed");
    assert!(output.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn wait_for_pane(socket: &str, text: &str) -> String {
    let started = Instant::now();
    loop {
        let pane = tmux(socket, &["capture-pane", "-p", "-t", "chat"]);
        if pane.contains(text) {
            return pane;
        }
        assert!(started.elapsed() < WAIT, "{text:?} not on the screen:\n{pane}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_works_in_a_terminal_under_tmux_and_ctrl_c_leaves() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let (alice, bob) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (alice, bob) = (alice.path(), bob.path());
    let room = two_in_a_room(&server, alice, bob).await;
    let tmux_socket = format!("kalandra-test-{}", std::process::id());
    // A shell runs the chat in the foreground and records how it ended: its
    // standard error and exit status (130 would be death by SIGINT, 134 an
    // abort), so that a failure says what happened. `trap : INT` keeps the
    // shell alive through the Ctrl-C without changing what the chat inherits.
    let (stderr_path, status_path) =
        (server_dir.path().join("chat.err"), server_dir.path().join("chat.status"));
    let command = format!(
        "trap : INT; {} --dir {} chat --room {room} 2>{}; echo \"exit $?\" >{}",
        env!("CARGO_BIN_EXE_kalandra"),
        bob.display(),
        stderr_path.display(),
        status_path.display()
    );
    tmux(
        &tmux_socket,
        &[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "chat",
            "-x",
            "200",
            "-y",
            "50",
            "sh",
            "-c",
            &command,
        ],
    );
    let _tmux_server = TmuxServer(tmux_socket.clone());
    tmux(&tmux_socket, &["set-option", "-t", "chat", "remain-on-exit", "on"]);
    wait_for_socket(bob).await;

    ok(alice, &["send", "--room", &room, "hello from alice"]).await;
    // The pane shows tabs as spaces.
    wait_for_pane(&tmux_socket, "hello from alice").await;
    tmux(&tmux_socket, &["send-keys", "-t", "chat", "typed in tmux", "Enter"]);
    let started = Instant::now();
    while !ok(alice, &["history", "--room", &room]).await.contains("\ttyped in tmux") {
        assert!(started.elapsed() < WAIT, "the typed line did not reach Alice");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    tmux(&tmux_socket, &["send-keys", "-t", "chat", "C-c"]);
    let started = Instant::now();
    let status = loop {
        if let Ok(status) = std::fs::read_to_string(&status_path) {
            break status;
        }
        let pane = tmux(&tmux_socket, &["capture-pane", "-p", "-t", "chat"]);
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        assert!(started.elapsed() < WAIT, "chat did not end on Ctrl-C; screen:\n{pane}\nstderr:\n{stderr}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert_eq!(status.trim(), "exit 0", "chat did not exit cleanly on Ctrl-C; stderr:\n{stderr}");
    assert!(!socket(bob).exists());
    server.stop().await;
}

/// Stops the test's tmux server (and what runs in it), also when the test fails.
struct TmuxServer(String);

impl Drop for TmuxServer {
    fn drop(&mut self) {
        let _ = Command::new("tmux").arg("-L").arg(&self.0).arg("kill-server").output();
    }
}
