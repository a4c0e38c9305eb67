//! The admin HTTP surface: liveness, readiness and Prometheus metrics.
//!
//! | path | answer |
//! |---|---|
//! | `GET /healthz` | 200 `ok` while the process runs |
//! | `GET /readyz` | 200 `ready` while the readiness flag is set, else 503 `not ready` |
//! | `GET /metrics` | 200, the metrics in the Prometheus text format |
//!
//! | `GET /openapi.json` | 200, the OpenAPI 3 document of every route |
//! | `/v1/…` | the operator's admin API ([`crate::admin_api`]), bearer-token authenticated |
//!
//! Health, readiness, metrics and the OpenAPI document have no
//! authentication: bind the listener to loopback or a private network.
//!
//! Every request is counted in `kalandra_admin_requests_total` by method,
//! route (the template of [`ROUTES`], never the ids in it) and status, and
//! gets one access-log line (target `kalandra_server::access`: method, path,
//! route, status, duration; never a header, so never a token). A 401 also
//! counts as a failed authentication.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::Router;

use crate::admin_api::{self, AdminApi, ADMIN_BODY_BYTES_MAX, ROUTES};

use crate::metrics::{Metrics, PROMETHEUS_TEXT_CONTENT_TYPE};
use crate::node::{Node, ROOMS_LIST_MAX};

/// Liveness path.
pub const HEALTHZ_PATH: &str = "/healthz";
/// Readiness path.
pub const READYZ_PATH: &str = "/readyz";
/// Metrics path.
pub const METRICS_PATH: &str = "/metrics";

/// What the admin endpoints read: the metrics and the readiness flag.
#[derive(Debug, Clone)]
pub struct AdminState {
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    api: Arc<std::sync::OnceLock<AdminApi>>,
}

impl AdminState {
    /// State over `metrics` and a shared readiness flag, which the server sets
    /// once storage is recovered and the QUIC listener is up, and clears when
    /// it starts draining.
    pub fn new(metrics: Metrics, ready: Arc<AtomicBool>) -> AdminState {
        AdminState { metrics, ready, api: Arc::new(std::sync::OnceLock::new()) }
    }

    /// Serves the admin API too, from now on (before, `/v1/` answers 503
    /// `not_ready`: the server starts the listener before it has recovered
    /// its rooms). A second call changes nothing.
    pub fn set_api(&self, api: AdminApi) {
        let _ = self.api.set(api);
    }

    /// The admin API, if served.
    pub fn api(&self) -> Option<&AdminApi> {
        self.api.get()
    }

    /// Sets or clears the readiness flag.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Whether the server is ready: the flag is set and the room core has
    /// not failed (storage failure, a shard task that panicked).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.api.get().is_some_and(AdminApi::node_failed)
    }
}

/// The admin routes over `state`.
///
/// Built from [`ROUTES`]: every route there is served, and no other.
pub fn admin_router(state: AdminState) -> Router {
    let mut router = Router::new();
    let mut paths: Vec<&str> = ROUTES.iter().map(|(_, path)| *path).collect();
    paths.dedup();
    for path in paths {
        let mut method_router: Option<MethodRouter<AdminState>> = None;
        for (method, _) in ROUTES.iter().filter(|(_, route)| *route == path) {
            let handler = match (*method, path) {
                ("GET", HEALTHZ_PATH) => get(healthz),
                ("GET", READYZ_PATH) => get(readyz),
                ("GET", METRICS_PATH) => get(metrics),
                _ => admin_api::handler(method, path).expect("every route in ROUTES has a handler"),
            };
            method_router = Some(match method_router {
                Some(existing) => existing.merge(handler),
                None => handler,
            });
        }
        if let Some(method_router) = method_router {
            router = router.route(path, method_router);
        }
    }
    router
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(ADMIN_BODY_BYTES_MAX))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_and_log))
        .with_state(state)
}

/// Index into [`ROUTES`] of the route `method` and `path` match: a
/// `{name}` segment matches any one non-empty segment.
pub fn route_index(method: &str, path: &str) -> Option<usize> {
    ROUTES.iter().position(|(route_method, template)| {
        *route_method == method && {
            let mut template = template.split('/');
            let mut actual = path.split('/');
            loop {
                match (template.next(), actual.next()) {
                    (None, None) => break true,
                    (Some(expected), Some(segment)) if expected.starts_with('{') => {
                        if segment.is_empty() {
                            break false;
                        }
                    }
                    (Some(expected), Some(segment)) if expected == segment => {}
                    _ => break false,
                }
            }
        }
    })
}

/// Counts the request and writes its access-log line.
async fn count_and_log(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let route = route_index(&method, &path);
    let response = next.run(request).await;
    let status = response.status().as_u16();
    state.metrics.admin_request(route, status);
    if status == StatusCode::UNAUTHORIZED.as_u16() {
        state.metrics.admin_auth_failed();
    }
    let route_name = route.map_or(crate::metrics::UNMATCHED_ROUTE, |index| ROUTES[index].1);
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    tracing::info!(
        target: "kalandra_server::access",
        %method, %path, route = %route_name, status, duration_ms, "admin request"
    );
    response
}

async fn not_found() -> Response {
    let body = r#"{"code":"not_found","message":"no such route"}"#;
    (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Serves the admin routes on `listener` until `shutdown` completes, then
/// lets requests in flight finish.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, admin_router(state)).with_graceful_shutdown(shutdown).await
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    match state.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, PROMETHEUS_TEXT_CONTENT_TYPE)], text).into_response(),
        Err(error) => {
            tracing::error!(%error, "cannot render metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot render metrics").into_response()
        }
    }
}

/// How often [`gauge_loop`] refreshes the room, membership and database gauges.
pub const GAUGE_REFRESH_INTERVAL_MS: u64 = 10_000;
/// Most pages of [`ROOMS_LIST_MAX`] rooms one refresh reads; beyond, the
/// room gauges stop at that many rooms.
pub const GAUGE_ROOM_PAGES_MAX: usize = 1_000;

/// Sets the room, membership and database-size gauges from `node` and the
/// database file at `database`.
pub async fn refresh_gauges(node: &Node, metrics: &Metrics, database: &Path) {
    let (mut rooms, mut members, mut after) = (0u64, 0u64, None);
    for _ in 0..GAUGE_ROOM_PAGES_MAX {
        let page = node.list_rooms(after, ROOMS_LIST_MAX).await;
        rooms += u64::try_from(page.len()).unwrap_or(u64::MAX);
        members += page.iter().map(|room| u64::try_from(room.members).unwrap_or(u64::MAX)).sum::<u64>();
        match page.last() {
            Some(last) if page.len() == ROOMS_LIST_MAX => after = Some(last.room_id),
            _ => break,
        }
    }
    metrics.set_rooms(rooms, members);
    if let Ok(file) = tokio::fs::metadata(database).await {
        metrics.set_database_size(file.len());
    }
}

/// Refreshes the gauges every [`GAUGE_REFRESH_INTERVAL_MS`], the first time at once.
pub async fn gauge_loop(node: Node, metrics: Metrics, database: PathBuf) {
    let mut tick = tokio::time::interval(Duration::from_millis(GAUGE_REFRESH_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        refresh_gauges(&node, &metrics, &database).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const TIMEOUT: Duration = Duration::from_secs(10);
    const RESPONSE_BYTES_MAX: u64 = 1024 * 1024;

    struct HttpResponse {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl HttpResponse {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }
    }

    /// One HTTP/1.1 request with `Connection: close`; the body is assumed not chunked.
    async fn request(address: SocketAddr, method: &str, path: &str) -> HttpResponse {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
            let request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.expect("write");
            let mut raw = Vec::new();
            stream.take(RESPONSE_BYTES_MAX).read_to_end(&mut raw).await.expect("read");
            raw
        };
        let raw = tokio::time::timeout(TIMEOUT, exchange).await.expect("response in time");
        let text = String::from_utf8(raw).expect("utf-8 response");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        let mut parts = status_line.split(' ');
        assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
        let status = parts.next().expect("status").parse().expect("numeric status");
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
            .collect();
        HttpResponse { status, headers, body: body.to_owned() }
    }

    #[tokio::test]
    async fn endpoints_answer_and_shutdown_stops_the_server() {
        let metrics = Metrics::new().expect("metrics");
        let ready = Arc::new(AtomicBool::new(false));
        let state = AdminState::new(metrics.clone(), Arc::clone(&ready));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_admin(listener, state.clone(), async move {
            let _ = stopped.await;
        }));

        let health = request(address, "GET", HEALTHZ_PATH).await;
        assert_eq!((health.status, health.body.as_str()), (200, "ok"));

        let not_ready = request(address, "GET", READYZ_PATH).await;
        assert_eq!((not_ready.status, not_ready.body.as_str()), (503, "not ready"));
        ready.store(true, Ordering::Release);
        let now_ready = request(address, "GET", READYZ_PATH).await;
        assert_eq!((now_ready.status, now_ready.body.as_str()), (200, "ready"));
        state.set_ready(false);
        assert_eq!(request(address, "GET", READYZ_PATH).await.status, 503);

        metrics.ack();
        metrics.rejected(kalandra_proto::ErrorCode::Banned);
        let scrape = request(address, "GET", METRICS_PATH).await;
        assert_eq!(scrape.status, 200);
        assert_eq!(scrape.header("content-type"), Some(PROMETHEUS_TEXT_CONTENT_TYPE));
        assert!(scrape.body.contains("kalandra_acks_total 1\n"), "{}", scrape.body);
        assert!(scrape.body.contains("kalandra_rejections_total{code=\"Banned\"} 1\n"), "{}", scrape.body);

        assert_eq!(request(address, "GET", "/nowhere").await.status, 404);
        // Before the rooms are recovered the API is not ready; the document is served.
        let early = request(address, "GET", "/v1/rooms").await;
        assert_eq!(early.status, 503);
        assert!(early.body.contains("\"not_ready\""), "{}", early.body);
        let document = request(address, "GET", "/openapi.json").await;
        assert_eq!(document.status, 200);
        assert!(document.body.contains("\"openapi\""));
        assert_eq!(request(address, "POST", HEALTHZ_PATH).await.status, 405);

        stop.send(()).expect("server still running");
        let finished = tokio::time::timeout(TIMEOUT, server).await.expect("stops in time");
        finished.expect("task").expect("serve result");
        assert!(tokio::net::TcpStream::connect(address).await.is_err(), "listener closed");
    }
}
