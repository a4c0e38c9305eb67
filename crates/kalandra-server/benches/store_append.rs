//! Durable appends of 200-byte log entries into a `RedbStore` on a temp dir.
//!
//! - `group_commit/submitters_64_in_flight_1`: 64 tasks, each appending to
//!   its own room and waiting for every acknowledgement before the next;
//! - `group_commit/submitters_64_in_flight_16`: the same with up to 16
//!   unacknowledged appends per task (a sequencer pipelining a busy room);
//! - `group_commit/submitters_1024_in_flight_1`: 1,024 tasks and rooms, so
//!   each transaction touches about as many rooms as it holds entries (the
//!   worst case for a log keyed by room);
//! - `direct/txn_per_entry`: one durable transaction per entry (baseline);
//! - `direct/txn_per_1000_entries`: `append_batch` of 1,000 entries (the
//!   store's ceiling without the driver).
//!
//! Run with `cargo bench -p kalandra-server --bench store_append`. With
//! `--bench`, an acknowledgement-latency report (p50/p99/max, mean batch
//! size) for the driver cases is printed first (not with `--profile-time`,
//! so that `valgrind --tool=callgrind <bench binary> --bench --profile-time 1
//! <case>` counts the instructions of one case alone).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use kalandra_server::store::{
    AppendTicket, GroupCommit, GroupCommitConfig, LogEntry, RedbStore, RoomId, Store,
};
use tokio::runtime::Runtime;

/// Size of each appended frame.
const FRAME_BYTES: usize = 200;
/// Concurrent submitting tasks (one room each).
const SUBMITTERS: usize = 64;
/// Submitting tasks (and rooms) of the many-rooms case.
const SUBMITTERS_MANY: usize = 1024;
/// The driver cases: (submitting tasks, appends in flight per task).
const DRIVER_CASES: [(usize, usize); 3] = [(SUBMITTERS, 1), (SUBMITTERS, 16), (SUBMITTERS_MANY, 1)];
/// Entries per latency-report run.
const REPORT_ENTRIES: usize = 200_000;
/// Entries per transaction in the direct batched case.
const DIRECT_BATCH_ENTRIES: u64 = 1_000;

static FRAME: [u8; FRAME_BYTES] = [0xab; FRAME_BYTES];

fn room(n: usize) -> RoomId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(n as u64).to_be_bytes());
    RoomId(id)
}

fn entry(room_id: RoomId, log_index: u64) -> LogEntry {
    LogEntry { room_id, log_index, frame: Bytes::from_static(&FRAME) }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<RedbStore>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(RedbStore::open(dir.path().join("bench.redb")).expect("open redb"));
    Fixture { _dir: dir, store }
}

/// Appends `total` entries through a fresh driver from `submitters` tasks
/// with up to `in_flight` unacknowledged appends each; returns the elapsed
/// time, every acknowledgement latency, and the driver.
fn run_driver(
    rt: &Runtime,
    store: Arc<RedbStore>,
    total: u64,
    submitters: usize,
    in_flight: usize,
) -> (Duration, Vec<Duration>, GroupCommit) {
    let gc = GroupCommit::start(store as Arc<dyn Store>, GroupCommitConfig::default())
        .expect("start group commit");
    let started = Instant::now();
    let latencies = rt.block_on(async {
        let mut tasks = Vec::with_capacity(submitters);
        for n in 0..submitters {
            let count = submitters as u64;
            let share = total / count + u64::from((n as u64) < total % count);
            let gc = gc.clone();
            tasks.push(tokio::spawn(async move {
                let room_id = room(n);
                let mut window: VecDeque<(Instant, AppendTicket)> = VecDeque::with_capacity(in_flight);
                let mut latencies = Vec::with_capacity(usize::try_from(share).unwrap_or(0));
                for log_index in 0..share {
                    if window.len() == in_flight {
                        let (sent, ticket) = window.pop_front().expect("window is full");
                        ticket.await.expect("durable append");
                        latencies.push(sent.elapsed());
                    }
                    let sent = Instant::now();
                    let ticket = gc.submit(vec![entry(room_id, log_index)]).await.expect("submit");
                    window.push_back((sent, ticket));
                }
                for (sent, ticket) in window {
                    ticket.await.expect("durable append");
                    latencies.push(sent.elapsed());
                }
                latencies
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.expect("submitter task"));
        }
        all
    });
    let elapsed = started.elapsed();
    rt.block_on(gc.shutdown()).expect("shutdown");
    (elapsed, latencies, gc)
}

fn percentile(sorted: &[Duration], per_mille: usize) -> Duration {
    sorted[(sorted.len() * per_mille / 1000).min(sorted.len() - 1)]
}

/// Prints throughput, acknowledgement latency and batch sizes of the driver.
fn latency_report() {
    let rt = runtime();
    for (submitters, in_flight) in DRIVER_CASES {
        let fixture = fixture();
        let (elapsed, mut latencies, gc) =
            run_driver(&rt, Arc::clone(&fixture.store), REPORT_ENTRIES as u64, submitters, in_flight);
        latencies.sort_unstable();
        let stats = gc.stats();
        println!(
            "report: {submitters} submitters x {in_flight} in flight, {REPORT_ENTRIES} entries of {FRAME_BYTES} B: \
             {:.0} entries/s; ack p50 {:?} p99 {:?} max {:?}; {} transactions, mean {:.1} entries, \
             mean transaction {:.0} us, max {} us",
            REPORT_ENTRIES as f64 / elapsed.as_secs_f64(),
            percentile(&latencies, 500),
            percentile(&latencies, 990),
            latencies.last().copied().unwrap_or_default(),
            stats.batches_written,
            stats.entries_written as f64 / stats.batches_written.max(1) as f64,
            stats.batch_latency_us_total as f64 / stats.batches_written.max(1) as f64,
            stats.batch_latency_us_max,
        );
    }
}

fn bench_store_append(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("store_append");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(10));

    for (submitters, in_flight) in DRIVER_CASES {
        group.bench_function(
            BenchmarkId::new("group_commit", format!("submitters_{submitters}_in_flight_{in_flight}")),
            |b| {
                b.iter_custom(|iters| {
                    let fixture = fixture();
                    run_driver(&rt, Arc::clone(&fixture.store), iters, submitters, in_flight).0
                });
            },
        );
    }

    group.bench_function(BenchmarkId::new("direct", "txn_per_entry"), |b| {
        b.iter_custom(|iters| {
            let fixture = fixture();
            let room_id = room(0);
            let started = Instant::now();
            for log_index in 0..iters {
                fixture.store.append_batch(&[entry(room_id, log_index)]).expect("append");
            }
            started.elapsed()
        });
    });

    group.bench_function(
        BenchmarkId::new("direct", format!("txn_per_{DIRECT_BATCH_ENTRIES}_entries")),
        |b| {
            b.iter_custom(|iters| {
                let fixture = fixture();
                let started = Instant::now();
                let mut next = vec![0u64; SUBMITTERS];
                let mut done = 0u64;
                while done < iters {
                    let size = DIRECT_BATCH_ENTRIES.min(iters - done);
                    let batch: Vec<LogEntry> = (0..size)
                        .map(|i| {
                            let n = usize::try_from(i).unwrap_or(0) % SUBMITTERS;
                            let log_index = next[n];
                            next[n] += 1;
                            entry(room(n), log_index)
                        })
                        .collect();
                    fixture.store.append_batch(&batch).expect("append");
                    done += size;
                }
                started.elapsed()
            });
        },
    );
    group.finish();
}

fn main() {
    // Only when benchmarking, not when `cargo test` runs the target once
    // nor under `--profile-time` (a profiler then sees only the case asked for).
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|arg| arg == "--bench") && !args.iter().any(|arg| arg.starts_with("--profile-time")) {
        latency_report();
    }
    let mut criterion = Criterion::default().configure_from_args();
    bench_store_append(&mut criterion);
    criterion.final_summary();
}
