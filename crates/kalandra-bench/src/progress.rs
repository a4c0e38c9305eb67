//! A progress line on standard error for long runs.

use std::io::{IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the line is redrawn on a terminal.
pub const REDRAW_INTERVAL_MS: u64 = 500;
/// How often a line is printed when standard error is not a terminal.
pub const LOG_INTERVAL_MS: u64 = 5_000;

/// A counter shown as `label: done/total (rate/s)` until dropped.
pub struct Progress {
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Starts showing progress towards `total` (nothing is shown if `quiet`).
    pub fn start(label: &'static str, total: u64, quiet: bool) -> Progress {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = (!quiet).then(|| {
            let (done, stop) = (Arc::clone(&done), Arc::clone(&stop));
            tokio::spawn(async move {
                let terminal = std::io::stderr().is_terminal();
                let interval =
                    Duration::from_millis(if terminal { REDRAW_INTERVAL_MS } else { LOG_INTERVAL_MS });
                let started = Instant::now();
                while !stop.load(Ordering::Acquire) {
                    tokio::time::sleep(interval).await;
                    let count = done.load(Ordering::Relaxed);
                    let rate = count as f64 / started.elapsed().as_secs_f64().max(1e-9);
                    let line = format!("{label}: {count}/{total} ({rate:.0}/s)");
                    let mut stderr = std::io::stderr().lock();
                    if terminal {
                        let _ = write!(stderr, "\r\x1b[2K{line}");
                    } else {
                        let _ = writeln!(stderr, "{line}");
                    }
                    let _ = stderr.flush();
                }
                if terminal {
                    let _ = write!(std::io::stderr().lock(), "\r\x1b[2K");
                }
            })
        });
        Progress { done, stop, task }
    }

    /// The shared counter to advance.
    pub fn counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.done)
    }

    /// Stops showing progress.
    pub async fn finish(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
