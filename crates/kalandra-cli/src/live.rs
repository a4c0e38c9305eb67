//! The long-running commands: `tail` (print a room's entries as they are
//! sequenced) and `chat` (the same, and send each line typed). Both serve
//! the device to other `kalandra` invocations while they run
//! ([`crate::device_socket`]) and stop cleanly on Ctrl-C (SIGINT) or
//! SIGTERM; `chat` also on the end of its input (Ctrl-D).
//!
//! One loop owns the device: it polls the connection for
//! [`POLL_INTERVAL_MS`] at a time and, between polls, sends typed lines and
//! answers forwarded requests. What it prints comes from the device's
//! history, up to the room's read cursor, so an entry is printed once and in
//! log order, however it arrived (live, by a catch-up inside a send, or by a
//! forwarded request).

use std::io::{BufRead as _, Read as _};
use std::time::Duration;

use client_core::client::{Client, ClientError, MESSAGE_BYTES_MAX};
use client_core::store::MESSAGES_PER_READ_MAX;
use kalandra_proto::RoomId;
use tokio::sync::mpsc;

use crate::device_socket::Pending;

/// How long one poll of the connection waits before the loop looks at
/// typed lines and forwarded requests again.
pub const POLL_INTERVAL_MS: u64 = 50;
/// Typed lines waiting to be sent, at most (the reader blocks beyond).
pub const INPUT_LINES_QUEUED_MAX: usize = 64;
/// Catch-ups in a row after frames past the cursor before giving up.
pub const RESYNCS_IN_A_ROW_MAX: u32 = 4;
/// Entries printed per history read.
const PRINT_BATCH_MAX: usize = 1024;

const _: () = assert!(PRINT_BATCH_MAX <= MESSAGES_PER_READ_MAX);

/// What a long-running command does.
pub struct LiveOptions {
    /// The room.
    pub room: RoomId,
    /// Stop after this long.
    pub for_ms: Option<u64>,
    /// Stop after printing this many new entries.
    pub count: Option<usize>,
    /// Read lines from standard input and send them.
    pub chat: bool,
}

/// Something that happened outside the loop.
enum Input {
    /// A line typed (without its newline).
    Line(String),
    /// A line over [`MESSAGE_BYTES_MAX`] bytes (not sent).
    TooLong,
    /// Standard input ended (Ctrl-D).
    End,
    /// SIGINT or SIGTERM.
    Interrupt,
}

/// Runs `tail` or `chat` on a connected device until it is told to stop,
/// answering the forwarded `requests` meanwhile. Prints the entries from
/// `from_log_index` (the room's cursor before connecting) on.
pub async fn run(
    client: &mut Client,
    out: &mut impl std::io::Write,
    options: &LiveOptions,
    from_log_index: u64,
    mut requests: Option<mpsc::Receiver<Pending>>,
    signals: StopSignals,
) -> anyhow::Result<()> {
    let mut inputs = spawn_inputs(signals, options.chat);
    let room = options.room;
    let mut printer = Printer { next_log_index: from_log_index, printed: 0 };
    client.sync(room).await?;
    printer.print_new(client, room, out)?;
    printer.printed = 0;
    client.subscribe(room).await?;
    let deadline = options.for_ms.map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    let mut resyncs_in_a_row = 0u32;
    loop {
        if options.count.is_some_and(|count| printer.printed >= count) {
            return Ok(());
        }
        let poll = match deadline {
            Some(deadline) => deadline.saturating_duration_since(tokio::time::Instant::now()),
            None => Duration::from_millis(POLL_INTERVAL_MS),
        };
        if poll.is_zero() {
            return Ok(());
        }
        while let Ok(input) = inputs.try_recv() {
            match input {
                Input::Line(text) if text.trim().is_empty() => {}
                Input::Line(text) => send_typed(client, room, &text).await?,
                Input::TooLong => {
                    eprintln!("kalandra: not sent: a message is at most {MESSAGE_BYTES_MAX} bytes")
                }
                Input::End | Input::Interrupt => return Ok(()),
            }
            printer.print_new(client, room, out)?;
        }
        while let Some(Ok((request, reply))) = requests.as_mut().map(mpsc::Receiver::try_recv) {
            let _ = reply.send(crate::serve_request(client, request).await);
            printer.print_new(client, room, out)?;
        }
        let poll = poll.min(Duration::from_millis(POLL_INTERVAL_MS));
        // Entries arrive as messages, or move the cursor silently (our own,
        // recorded at their acknowledgement, when the log reaches them).
        match client.next_message(poll).await {
            Ok(_) => resyncs_in_a_row = 0,
            // A frame past the cursor: our own frame (not sent back to the
            // connection that submitted it) was acknowledged while earlier
            // frames were still on their way. Read the log again from the cursor.
            Err(ClientError::Protocol(_)) if resyncs_in_a_row < RESYNCS_IN_A_ROW_MAX => {
                resyncs_in_a_row += 1;
                client.sync(room).await?;
            }
            Err(error) => return Err(error.into()),
        }
        printer.print_new(client, room, out)?;
    }
}

/// Sends a typed line; a refusal is printed and the chat goes on, a lost
/// connection ends it (the message stays in the outbox).
async fn send_typed(client: &mut Client, room: RoomId, text: &str) -> anyhow::Result<()> {
    match client.send(room, text.as_bytes()).await {
        Ok(_) => Ok(()),
        Err(error) if error.is_transient() => Err(error.into()),
        Err(error) => {
            eprintln!("kalandra: not sent: {error}");
            Ok(())
        }
    }
}

/// The room's read cursor: every entry before it has been read.
pub fn cursor(client: &Client, room: RoomId) -> u64 {
    client.rooms().iter().find(|summary| summary.room_id == room).map_or(0, |summary| summary.next_log_index)
}

/// Prints the history entries the device has read since the last print.
struct Printer {
    next_log_index: u64,
    printed: usize,
}

impl Printer {
    fn print_new(
        &mut self,
        client: &Client,
        room: RoomId,
        out: &mut impl std::io::Write,
    ) -> anyhow::Result<()> {
        let read_up_to = cursor(client, room);
        while self.next_log_index < read_up_to {
            let entries = client.history(room, self.next_log_index, PRINT_BATCH_MAX)?;
            let mut advanced = false;
            for message in entries.iter().take_while(|message| message.log_index < read_up_to) {
                crate::print_message(out, message)?;
                self.printed += 1;
                self.next_log_index = message.log_index + 1;
                advanced = true;
            }
            if !advanced || entries.len() < PRINT_BATCH_MAX {
                break;
            }
        }
        self.next_log_index = self.next_log_index.max(read_up_to);
        out.flush()?;
        Ok(())
    }
}

/// SIGINT and SIGTERM, registered with the operating system when this is
/// made: a signal that arrives at any point after it (while connecting, or
/// before the input task first runs) is kept until it is read, instead of
/// killing the process.
pub struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Registers the handlers; call inside the runtime, before anything
    /// that should end cleanly on Ctrl-C.
    pub fn install() -> std::io::Result<StopSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(StopSignals {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignals {})
    }

    /// Waits for the next SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Signals (always) and standard input's lines (for `chat`), as inputs.
fn spawn_inputs(mut signals: StopSignals, read_stdin: bool) -> mpsc::Receiver<Input> {
    let (sender, inputs) = mpsc::channel(INPUT_LINES_QUEUED_MAX);
    let interrupts = sender.clone();
    tokio::spawn(async move {
        signals.recv().await;
        let _ = interrupts.send(Input::Interrupt).await;
    });
    if read_stdin {
        // A thread, not a blocking task: the runtime does not wait for it at exit.
        std::thread::spawn(move || read_lines(&sender));
    }
    inputs
}

/// Reads standard input line by line (each at most [`MESSAGE_BYTES_MAX`]
/// bytes) until it ends.
fn read_lines(sender: &mpsc::Sender<Input>) {
    let stdin = std::io::stdin();
    let mut stdin = stdin.lock();
    let limit = u64::try_from(MESSAGE_BYTES_MAX + 1).unwrap_or(u64::MAX);
    loop {
        let mut line = Vec::new();
        let input = match (&mut stdin).take(limit).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => Input::End,
            Ok(_) if line.last() == Some(&b'\n') || line.len() <= MESSAGE_BYTES_MAX => {
                while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    line.pop();
                }
                Input::Line(String::from_utf8_lossy(&line).into_owned())
            }
            Ok(_) => {
                // Skip the rest of the long line.
                let mut rest = Vec::new();
                let _ = stdin.read_until(b'\n', &mut rest);
                Input::TooLong
            }
        };
        let end = matches!(input, Input::End);
        if sender.blocking_send(input).is_err() || end {
            return;
        }
    }
}
