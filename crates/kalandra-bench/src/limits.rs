//! Every bound of the load generator, in one place.

/// Client QUIC endpoints (UDP sockets) that connections are spread over.
pub const CLIENT_ENDPOINTS_MAX: usize = 64;
/// Kernel receive and send buffer asked for each client UDP socket (capped
/// by the kernel at `net.core.rmem_max` / `wmem_max`).
pub const CLIENT_UDP_BUFFER_BYTES: usize = 8 * 1024 * 1024;
/// Connections being set up at once.
pub const CONNECT_CONCURRENCY_MAX: usize = 64;
/// Members of one room the generator builds (the protocol's Welcome limit).
pub const ROOM_MEMBERS_MAX: usize = kalandra_proto::limits::WELCOME_RECIPIENTS_MAX;
/// Rooms of one throughput run.
pub const ROOMS_MAX: usize = 4_096;
/// Idle connections of one connections run.
pub const CONNECTIONS_MAX: usize = 100_000;
/// Frames one sender may have sealed for a run (bounds the generator's memory).
pub const FRAMES_PER_RUN_MAX: usize = 20_000_000;
/// Requests one connection keeps in flight at most.
pub const WINDOW_MAX: usize = 4_096;
/// Plaintext bytes of one message at most.
pub const MESSAGE_BYTES_MAX: usize = 64 * 1024;
/// Plaintext bytes at least (the generation is written into the first four).
pub const MESSAGE_BYTES_MIN: usize = 4;
/// Commits timed per kind and room size at most.
pub const COMMIT_ITERATIONS_MAX: usize = 100;
/// Fixed-rate load: frames per second at most.
pub const RATE_FRAMES_PER_SECOND_MAX: u64 = 1_000_000;
/// Fixed-rate load: seconds at most.
pub const DURATION_SECONDS_MAX: u64 = 600;
/// Longest a request during setup may take.
pub const REQUEST_TIMEOUT_MS: u64 = 120_000;
/// Longest a run's timed part may take after its last frame was sent,
/// before stragglers are given up on.
pub const DRAIN_TIMEOUT_MS: u64 = 60_000;
/// How long a receive loop waits for a frame before it checks whether the run is over.
pub const RECEIVE_SLICE_MS: u64 = 200;
/// First request id of sealed load frames (setup requests use lower ids).
pub const LOAD_REQUEST_ID_FIRST: u32 = 1 << 24;
/// Time the server process gets to print its address.
pub const SERVER_STARTUP_TIMEOUT_MS: u64 = 60_000;
/// Time SIGTERM gets to stop the server process before it is killed.
pub const SERVER_STOP_TIMEOUT_MS: u64 = 15_000;
/// Time idle connections get to settle before the server's memory is read.
pub const CONNECTIONS_SETTLE_MS: u64 = 2_000;
/// Longest the federation scenario waits for the link between its two servers.
pub const LINK_TIMEOUT_MS: u64 = 30_000;
/// Unacknowledged frames per sender on b at most: the authority queues at
/// most this many relayed frames of one remote connection (more are
/// refused `RateLimited`).
pub const RELAYED_WINDOW_MAX: usize = 64;
/// Rounds of the federation scenario's lag part at most.
pub const LAG_ROUNDS_MAX: usize = 100;
/// Receivers (or senders) of one kind in a federation room at most (they are set up one by one).
pub const ROOM_RECEIVERS_MAX: usize = 256;
/// Histogram range: the highest latency recorded, in microseconds (larger values are clamped).
pub const LATENCY_US_MAX: u64 = 600_000_000;

const _: () = assert!(MESSAGE_BYTES_MIN <= MESSAGE_BYTES_MAX);
const _: () = assert!(
    MESSAGE_BYTES_MAX <= client_core::sender_keys::PLAINTEXT_BYTES_MAX,
    "a message must fit one Application payload"
);
const _: () = assert!(WINDOW_MAX <= 4_096, "the server's in-flight frames per room");
const _: () = assert!(CONNECT_CONCURRENCY_MAX <= CONNECTIONS_MAX);
const _: () = assert!((LOAD_REQUEST_ID_FIRST as usize) > WINDOW_MAX);
