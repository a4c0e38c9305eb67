//! The operator's admin API (HTTP, JSON) on the admin listener: rooms,
//! members, roles, kick, ban, unban, redaction of a log entry, a room's
//! retention period, and the audit log's export and verification. Described by an OpenAPI 3 document at `/openapi.json`
//! (`docs/openapi.json`), which lists exactly the routes of [`ROUTES`](crate::admin::routes::ROUTES).
//!
//! Every request under `/v1/` carries `Authorization: Bearer <token>`. The
//! operator token may do everything; the optional read-only token may only
//! read (rooms, members, audit). Errors are JSON `{"code": "...",
//! "message": "..."}` with a stable `code`:
//!
//! | status | code | when |
//! |---|---|---|
//! | 400 | `malformed_request` | a bad id, body, query, role name, reason or retention period |
//! | 401 | `unauthorized` | no token, or not a configured token |
//! | 403 | `insufficient_scope` | the read-only token asked for a change |
//! | 404 | `unknown_room`, `unknown_member`, `unknown_log_index` | no such room; a kick of a non-member; an index beyond the room's log |
//! | 409 | `removal_pending`, `not_banned`, `role_held`, `role_not_held`, `admin_role_fixed`, `limit_reached`, `not_erasable` | the room's state does not allow the act; a handshake frame, which is never erased |
//! | 429 | `busy` | too many moderation acts in progress |
//! | 503 | `not_ready`, `storage_unavailable`, `shutting_down` | the server cannot act now |

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use kalandra_proto::{RoomId, SenderId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::admin::metrics::Metrics;
use crate::federation::links::FederationLinks;
use crate::node::erasure::{RedactAuthority, RedactError};
use crate::node::{ModerationFailure, ModerationRequest, Node, RoomInfo, ROOMS_LIST_MAX};
use crate::room::audit::{
    self, AuditExport, AuditRecord, AuditVerifier, ExportedHead, AUDIT_PAGE_RECORDS_MAX,
};
use crate::room::roles::{Act, Actor, ModerationError, Role};
use crate::room::sequencer::SubmitError;
use crate::store::backup::{check_backup_name, write_backup, BackupError};
use crate::store::{RedactOutcome, RetentionError, Store};

/// Largest request body the admin API reads.
pub const ADMIN_BODY_BYTES_MAX: usize = 16 * 1024;
/// Most records one audit export holds; a longer log is exported in pages
/// (`from` and `limit`).
pub const AUDIT_EXPORT_RECORDS_MAX: usize = 100_000;
/// Shortest accepted token.
pub const ADMIN_TOKEN_CHARS_MIN: usize = 16;
/// Longest accepted token.
pub const ADMIN_TOKEN_CHARS_MAX: usize = 256;

/// Longest reason, in characters (the schema's `maxLength`): any such
/// text fits the audit record's byte limit.
pub const REASON_CHARS_MAX: usize = 256;

const _: () = assert!(AUDIT_EXPORT_RECORDS_MAX >= AUDIT_PAGE_RECORDS_MAX);
const _: () = assert!(REASON_CHARS_MAX * 4 <= kalandra_proto::limits::TEXT_BYTES_MAX);
const _: () = assert!(ADMIN_TOKEN_CHARS_MIN < ADMIN_TOKEN_CHARS_MAX);

/// `WWW-Authenticate` of a 401 without a bearer token (RFC 6750 §3: no error code).
pub const CHALLENGE_NO_TOKEN: &str = "Bearer realm=\"kalandra-admin\"";
/// `WWW-Authenticate` of a 401 with a token that is not valid.
pub const CHALLENGE_INVALID_TOKEN: &str = "Bearer realm=\"kalandra-admin\", error=\"invalid_token\"";

/// The OpenAPI 3 document describing every route.
pub const OPENAPI_JSON: &str = include_str!("../../../../docs/openapi.json");

/// What the admin endpoints read: the metrics and the readiness flag.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub(super) metrics: Metrics,
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
    #[cfg(test)]
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Whether the server is ready: the flag is set and the room core has
    /// not failed (storage failure, a shard task that panicked).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.api.get().is_some_and(AdminApi::node_failed)
    }
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Read rooms, members and the audit log.
    Read,
    /// Everything.
    Operator,
}

/// The admin API's tokens and the room core it acts on.
#[derive(Clone)]
pub struct AdminApi {
    node: Node,
    operator_token_hash: [u8; 32],
    read_token_hash: Option<[u8; 32]>,
    /// Where `POST /v1/backup` writes, if the operator configured it.
    backup: Option<BackupTarget>,
    /// The federation identity and per-peer link state.
    federation: Option<FederationLinks>,
}

impl std::fmt::Debug for AdminApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminApi").finish_non_exhaustive()
    }
}

impl AdminApi {
    /// Whether the room core has failed (the process is stopping).
    pub fn node_failed(&self) -> bool {
        self.node.health().has_failed()
    }

    /// The API over `node`, accepting `operator_token` for everything and
    /// `read_token` (if any) for reading.
    pub fn new(node: Node, operator_token: &str, read_token: Option<&str>) -> AdminApi {
        AdminApi {
            node,
            operator_token_hash: Sha256::digest(operator_token.as_bytes()).into(),
            read_token_hash: read_token.map(|token| Sha256::digest(token.as_bytes()).into()),
            backup: None,
            federation: None,
        }
    }

    /// Serves `GET /v1/federation` from `links`.
    pub fn with_federation(mut self, links: FederationLinks) -> AdminApi {
        self.federation = Some(links);
        self
    }

    /// Serves `POST /v1/backup` into `dir` (an existing directory); without
    /// one (`None`), the route answers 409 `backup_not_configured`.
    pub fn with_backup_dir(mut self, dir: Option<std::path::PathBuf>) -> AdminApi {
        self.backup = dir.map(|dir| BackupTarget { dir, running: Arc::default() });
        self
    }

    /// The scope of the request's bearer token, or the error to answer.
    /// The scheme name is case-insensitive (RFC 9110 §11.1).
    fn authorize(&self, headers: &HeaderMap, needed: Scope) -> Result<(), ApiError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token)
            .ok_or_else(|| ApiError::unauthorized(CHALLENGE_NO_TOKEN, "a bearer token is required"))?;
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let scope = if same(&presented, &self.operator_token_hash) {
            Scope::Operator
        } else if self.read_token_hash.is_some_and(|hash| same(&presented, &hash)) {
            Scope::Read
        } else {
            return Err(ApiError::unauthorized(CHALLENGE_INVALID_TOKEN, "the token is not valid"));
        };
        if needed == Scope::Operator && scope != Scope::Operator {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                "the read-only token cannot change anything",
            ));
        }
        Ok(())
    }
}

/// The token of an `Authorization: Bearer <token>` value, any case of `Bearer`.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Compares two digests in time independent of where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A JSON error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The `WWW-Authenticate` value of a 401 (RFC 6750 §3).
    challenge: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), challenge: None }
    }

    /// A 401 with the `WWW-Authenticate` `challenge`.
    fn unauthorized(challenge: &'static str, message: &str) -> ApiError {
        ApiError {
            challenge: Some(challenge),
            ..ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
        }
    }

    fn malformed(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "malformed_request", message)
    }

    fn unavailable() -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the server is still starting")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_string(&ErrorBody { code: self.code, message: &self.message })
            .unwrap_or_else(|_| String::from("{\"code\":\"internal\",\"message\":\"\"}"));
        let mut response = (self.status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if let Some(challenge) = self.challenge {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static(challenge));
        }
        response
    }
}

impl From<ModerationFailure> for ApiError {
    fn from(failure: ModerationFailure) -> ApiError {
        let message = failure.to_string();
        let (status, code) = match &failure {
            ModerationFailure::UnknownRoom => (StatusCode::NOT_FOUND, "unknown_room"),
            ModerationFailure::NotMember(_) => (StatusCode::NOT_FOUND, "unknown_member"),
            ModerationFailure::RemovalPending(_) => (StatusCode::CONFLICT, "removal_pending"),
            ModerationFailure::NotBanned(_) => (StatusCode::CONFLICT, "not_banned"),
            ModerationFailure::Refused(ModerationError::RoleHeld) => (StatusCode::CONFLICT, "role_held"),
            ModerationFailure::Refused(ModerationError::RoleNotHeld) => {
                (StatusCode::CONFLICT, "role_not_held")
            }
            ModerationFailure::Refused(ModerationError::AdminRoleFixed) => {
                (StatusCode::CONFLICT, "admin_role_fixed")
            }
            ModerationFailure::Refused(ModerationError::TooManyRoles)
            | ModerationFailure::Sequencer(SubmitError::TooManyBans | SubmitError::TooManyServerProposals) => {
                (StatusCode::CONFLICT, "limit_reached")
            }
            ModerationFailure::Refused(ModerationError::Forbidden(_) | ModerationError::SelfTarget) => {
                (StatusCode::FORBIDDEN, "insufficient_scope")
            }
            ModerationFailure::Busy | ModerationFailure::Sequencer(SubmitError::Overloaded { .. }) => {
                (StatusCode::TOO_MANY_REQUESTS, "busy")
            }
            ModerationFailure::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            ModerationFailure::Storage(_) | ModerationFailure::Sequencer(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
            }
        };
        ApiError::new(status, code, message)
    }
}

impl From<RedactError> for ApiError {
    fn from(error: RedactError) -> ApiError {
        let message = error.to_string();
        let (status, code) = match &error {
            RedactError::UnknownRoom { .. } => (StatusCode::NOT_FOUND, "unknown_room"),
            RedactError::UnknownLogIndex { .. } => (StatusCode::NOT_FOUND, "unknown_log_index"),
            RedactError::NotErasable { .. } => (StatusCode::CONFLICT, "not_erasable"),
            // The operator's authority covers every sender and is no
            // member's: not reached.
            RedactError::NotSender { .. } | RedactError::NotMember { .. } | RedactError::Banned { .. } => {
                (StatusCode::FORBIDDEN, "insufficient_scope")
            }
            RedactError::Storage(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable"),
            RedactError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, message)
    }
}

impl From<RetentionError> for ApiError {
    fn from(error: RetentionError) -> ApiError {
        let message = error.to_string();
        let (status, code) = match &error {
            RetentionError::UnknownRoom { .. } => (StatusCode::NOT_FOUND, "unknown_room"),
            RetentionError::PeriodTooShort { .. } => (StatusCode::BAD_REQUEST, "malformed_request"),
            RetentionError::Storage(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable"),
            RetentionError::SweepPosition { .. } | RetentionError::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, message)
    }
}

fn json<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(error) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", error.to_string()).into_response()
        }
    }
}

/// Whether `text` is `digits` lowercase hex digits (the only spelling the
/// API accepts, as its schema says).
fn is_lower_hex(text: &str, digits: usize) -> bool {
    text.len() == digits && text.bytes().all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
}

fn parse_room(text: &str) -> Result<RoomId, ApiError> {
    if !is_lower_hex(text, 32) {
        return Err(ApiError::malformed("a room id is 32 lowercase hex digits"));
    }
    let bytes = hex::decode(text).map_err(|_| ApiError::malformed("a room id is 32 hex digits"))?;
    let bytes: [u8; 16] = bytes.try_into().map_err(|_| ApiError::malformed("a room id is 32 hex digits"))?;
    Ok(RoomId(bytes))
}

fn parse_user(text: &str) -> Result<SenderId, ApiError> {
    if !is_lower_hex(text, 16) {
        return Err(ApiError::malformed("a user id is 16 lowercase hex digits"));
    }
    u64::from_str_radix(text, 16).map(SenderId).map_err(|_| ApiError::malformed("a user id is 16 hex digits"))
}

fn parse_role(text: &str) -> Result<Role, ApiError> {
    Role::parse(text).ok_or_else(|| ApiError::malformed(format!("unknown role {text:?}")))
}

fn parse_reason(reason: Option<String>) -> Result<String, ApiError> {
    let reason = reason.unwrap_or_default();
    if reason.chars().count() > REASON_CHARS_MAX {
        return Err(ApiError::malformed(format!("reason is longer than {REASON_CHARS_MAX} characters")));
    }
    Ok(reason)
}

fn parse_body<T: for<'de> Deserialize<'de>>(headers: &HeaderMap, body: &[u8]) -> Result<T, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !is_json {
        return Err(ApiError::malformed("the body must be application/json"));
    }
    serde_json::from_slice(body).map_err(|error| ApiError::malformed(format!("body: {error}")))
}

fn parse_query(query: Option<&str>) -> Result<HashMap<String, String>, ApiError> {
    let mut values = HashMap::new();
    for pair in query.unwrap_or_default().split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if values.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(ApiError::malformed(format!("query parameter {key} repeated")));
        }
    }
    Ok(values)
}

fn query_number(
    values: &HashMap<String, String>,
    key: &str,
    default: u64,
    max: u64,
) -> Result<u64, ApiError> {
    match values.get(key) {
        None => Ok(default),
        Some(text) if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) => {
            Err(ApiError::malformed(format!("{key} must be a number from 0 to {max}")))
        }
        Some(text) => match text.parse::<u64>() {
            Ok(value) if value <= max => Ok(value),
            _ => Err(ApiError::malformed(format!("{key} must be a number from 0 to {max}"))),
        },
    }
}

fn api(state: &AdminState) -> Result<&AdminApi, ApiError> {
    state.api().ok_or_else(ApiError::unavailable)
}

/// The router for the `/v1/` routes and `/openapi.json` (the others are
/// added by `admin_router` of the admin listener, which calls this).
pub fn handler(method: &str, path: &str) -> Option<MethodRouter<AdminState>> {
    let filter = match method {
        "GET" => MethodFilter::GET,
        "POST" => MethodFilter::POST,
        "PUT" => MethodFilter::PUT,
        "DELETE" => MethodFilter::DELETE,
        _ => return None,
    };
    let router = match (method, path) {
        ("GET", "/openapi.json") => on(filter, openapi),
        ("GET", "/v1/rooms") => on(filter, list_rooms),
        ("GET", "/v1/rooms/{room_id}") => on(filter, show_room),
        ("GET", "/v1/rooms/{room_id}/members") => on(filter, members),
        ("POST", "/v1/rooms/{room_id}/roles") => on(filter, grant_role),
        ("DELETE", "/v1/rooms/{room_id}/roles/{user_id}/{role}") => on(filter, revoke_role),
        ("POST", "/v1/rooms/{room_id}/kick") => on(filter, kick),
        ("POST", "/v1/rooms/{room_id}/bans") => on(filter, ban),
        ("DELETE", "/v1/rooms/{room_id}/bans/{user_id}") => on(filter, unban),
        ("POST", "/v1/rooms/{room_id}/redact") => on(filter, redact),
        ("GET", "/v1/rooms/{room_id}/retention") => on(filter, show_retention),
        ("PUT", "/v1/rooms/{room_id}/retention") => on(filter, set_retention),
        ("DELETE", "/v1/rooms/{room_id}/retention") => on(filter, clear_retention),
        ("GET", "/v1/audit/export") => on(filter, audit_export),
        ("GET", "/v1/audit/verify") => on(filter, audit_verify),
        ("POST", "/v1/backup") => on(filter, backup),
        ("GET", "/v1/federation") => on(filter, federation),
        _ => return None,
    };
    Some(router)
}

/// `GET /v1/federation`: this server's domain and federation key, and the
/// link state of each configured peer.
async fn federation(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    let result = (|| {
        let api = api(&state)?;
        api.authorize(&headers, Scope::Read)?;
        api.federation.as_ref().map(FederationLinks::view).ok_or_else(ApiError::unavailable)
    })();
    match result {
        Ok(view) => json(&view),
        Err(error) => error.into_response(),
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

/// A room in the listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomListEntry {
    /// Room id, 32 hex digits.
    pub room_id: String,
    /// Creator (admin), 16 hex digits.
    pub creator: String,
    /// Current MLS epoch.
    pub epoch: u64,
    /// Number of members.
    pub members: usize,
    /// Index the next frame gets.
    pub next_log_index: u64,
}

/// `GET /v1/rooms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomList {
    /// Rooms in id order.
    pub rooms: Vec<RoomListEntry>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<String>,
}

async fn list_rooms(
    State(state): State<AdminState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let result = async {
        let api = api(&state)?;
        api.authorize(&headers, Scope::Read)?;
        let query = parse_query(query.as_deref())?;
        let after = query.get("after").map(|after| parse_room(after)).transpose()?;
        let max = u64::try_from(ROOMS_LIST_MAX).unwrap_or(u64::MAX);
        let limit = usize::try_from(query_number(&query, "limit", max, max)?).unwrap_or(ROOMS_LIST_MAX);
        let rooms = api.node.list_rooms(after, limit).await;
        let next_after = (limit > 0 && rooms.len() == limit)
            .then(|| rooms.last().map(|r| r.room_id.to_string()))
            .flatten();
        let rooms = rooms
            .into_iter()
            .map(|room| RoomListEntry {
                room_id: room.room_id.to_string(),
                creator: room.creator.to_string(),
                epoch: room.epoch,
                members: room.members,
                next_log_index: room.next_log_index,
            })
            .collect();
        Ok::<_, ApiError>(json(&RoomList { rooms, next_after }))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// A ban in a room's description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanView {
    /// The banned user, 16 hex digits.
    pub user_id: String,
    /// When the ban ends (ms since the Unix epoch); absent: until lifted.
    pub until_ms: Option<u64>,
}

/// A role holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleView {
    /// The user, 16 hex digits.
    pub user_id: String,
    /// `admin` or `moderator`.
    pub role: String,
}

/// `GET /v1/rooms/{room_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomView {
    /// Room id.
    pub room_id: String,
    /// Creator (admin).
    pub creator: String,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Current MLS epoch.
    pub epoch: u64,
    /// Index the next frame gets.
    pub next_log_index: u64,
    /// Number of members.
    pub member_count: usize,
    /// Role holders, the creator first.
    pub roles: Vec<RoleView>,
    /// Bans in force or not yet expired.
    pub bans: Vec<BanView>,
    /// Server-issued proposals waiting for a covering commit.
    pub server_proposals_pending: usize,
    /// Log index of the first of them.
    pub pending_since_log_index: Option<u64>,
    /// Server time of the first of them.
    pub pending_since_ms: Option<u64>,
}

fn room_view(info: &RoomInfo) -> RoomView {
    RoomView {
        room_id: info.room_id.to_string(),
        creator: info.creator.to_string(),
        created_at_ms: info.created_at_ms,
        epoch: info.epoch,
        next_log_index: info.next_log_index,
        member_count: info.members.len(),
        roles: info
            .roles
            .iter()
            .map(|(user, role)| RoleView { user_id: user.to_string(), role: role.as_str().to_owned() })
            .collect(),
        bans: info
            .bans
            .iter()
            .map(|(user, until_ms)| BanView { user_id: user.to_string(), until_ms: *until_ms })
            .collect(),
        server_proposals_pending: info.server_proposals_pending,
        pending_since_log_index: info.pending_since.map(|(index, _)| index),
        pending_since_ms: info.pending_since.map(|(_, at)| at),
    }
}

async fn room_of(api: &AdminApi, room: &str) -> Result<RoomInfo, ApiError> {
    let room_id = parse_room(room)?;
    api.node
        .room_info(room_id)
        .await
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown_room", format!("no room {room_id}")))
}

async fn show_room(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> Response {
    let result = async {
        let api = api(&state)?;
        api.authorize(&headers, Scope::Read)?;
        let info = room_of(api, &room).await?;
        Ok::<_, ApiError>(json(&room_view(&info)))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// A member in `GET /v1/rooms/{room_id}/members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// The member, 16 hex digits.
    pub user_id: String,
    /// Their role, if any.
    pub role: Option<String>,
    /// Whether the server proposed their removal and no commit covered it yet.
    pub removal_pending: bool,
}

/// `GET /v1/rooms/{room_id}/members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberList {
    /// Members by user id.
    pub members: Vec<MemberView>,
}

async fn members(State(state): State<AdminState>, headers: HeaderMap, Path(room): Path<String>) -> Response {
    let result = async {
        let api = api(&state)?;
        api.authorize(&headers, Scope::Read)?;
        let info = room_of(api, &room).await?;
        let members = info
            .members
            .iter()
            .map(|member| MemberView {
                user_id: member.to_string(),
                role: info
                    .roles
                    .iter()
                    .find(|(user, _)| user == member)
                    .map(|(_, role)| role.as_str().to_owned()),
                removal_pending: info.removals_pending.contains(member),
            })
            .collect();
        Ok::<_, ApiError>(json(&MemberList { members }))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The answer to an act: what was sequenced and the audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActDone {
    /// Log index of the Remove proposal, for kicks and bans of members.
    pub log_index: Option<u64>,
    /// The room's epoch when the act was decided.
    pub epoch: u64,
    /// The act's audit record.
    pub audit: AuditRecord,
}

async fn act(
    api: &AdminApi,
    room: &str,
    target: SenderId,
    act: Act,
    reason: String,
) -> Result<Response, ApiError> {
    let room_id = parse_room(room)?;
    let request = ModerationRequest { room_id, actor: Actor::Operator, target, act, reason };
    let done = api.node.moderate(request).await?;
    Ok(json(&ActDone { log_index: done.log_index, epoch: done.epoch, audit: done.audit }))
}

/// Body of `POST /v1/rooms/{room_id}/roles`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    /// The user, 16 hex digits.
    pub user_id: String,
    /// The role (`moderator`).
    pub role: String,
    /// Why, for the audit log.
    pub reason: Option<String>,
}

async fn grant_role(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(room): Path<String>,
    body: Bytes,
) -> Response {
    let result = async {
        let api = api(&state)?;
        api.authorize(&headers, Scope::Operator)?;
        let body: GrantBody = parse_body(&headers, &body)?;
        let (target, role, reason) =
            (parse_user(&body.user_id)?, parse_role(&body.role)?, parse_reason(body.reason)?);
        act(api, &room, target, Act::Grant(role), reason).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn revoke_role(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path((room, user, role)): Path<(String, String, String)>,
) -> Response {
    let result = async {
        let api = api(&state)?;
        api.authorize(&headers, Scope::Operator)?;
        let (target, role) = (parse_user(&user)?, parse_role(&role)?);
        act(api, &room, target, Act::Revoke(role), String::new()).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Body of `POST /v1/rooms/{room_id}/kick`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KickBody {
    /// The member, 16 hex digits.
    pub user_id: String,
    /// Why, for the audit log.
    pub reason: Option<String>,
}

async fn kick(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(room): Path<String>,
    body: Bytes,
) -> Response {
    let result = async {
        let api = api(&state)?;
        api.authorize(&headers, Scope::Operator)?;
        let body: KickBody = parse_body(&headers, &body)?;
        let (target, reason) = (parse_user(&body.user_id)?, parse_reason(body.reason)?);
        act(api, &room, target, Act::Kick, reason).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Body of `POST /v1/rooms/{room_id}/bans`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BanBody {
    /// The user, 16 hex digits.
    pub user_id: String,
    /// Why, for the audit log.
    pub reason: Option<String>,
    /// Ban length; absent for a ban until lifted.
    pub duration_ms: Option<u64>,
}

async fn ban(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(room): Path<String>,
    body: Bytes,
) -> Response {
    let result = async {
        let api = api(&state)?;
        api.authorize(&headers, Scope::Operator)?;
        let body: BanBody = parse_body(&headers, &body)?;
        let (target, reason) = (parse_user(&body.user_id)?, parse_reason(body.reason)?);
        act(api, &room, target, Act::Ban { duration_ms: body.duration_ms }, reason).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn unban(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path((room, user)): Path<(String, String)>,
) -> Response {
    let result = async {
        let api = api(&state)?;
        api.authorize(&headers, Scope::Operator)?;
        act(api, &room, parse_user(&user)?, Act::Unban, String::new()).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Body of `POST /v1/rooms/{room_id}/redact`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactBody {
    /// The entry's log index.
    pub log_index: u64,
    /// Why, for the audit log.
    pub reason: Option<String>,
}

/// The answer to `POST /v1/rooms/{room_id}/redact`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedactDone {
    /// The erased entry.
    pub log_index: u64,
    /// The entry's MLS epoch.
    pub epoch: u64,
    /// When its content was erased (now, or the earlier erasure's time).
    pub erased_at_ms: u64,
    /// `erased` (by this request) or `already_erased` (nothing done).
    pub outcome: String,
    /// The audit record of the erasure (absent when already erased).
    pub audit: Option<AuditRecord>,
}

async fn redact(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(room): Path<String>,
    body: Bytes,
) -> Response {
    let result = async {
        let api = api(&state)?;
        api.authorize(&headers, Scope::Operator)?;
        let room_id = parse_room(&room)?;
        let body: RedactBody = parse_body(&headers, &body)?;
        let reason = parse_reason(body.reason)?;
        let authority = RedactAuthority::Operator;
        let report =
            api.node.redact_with_reason(room_id, body.log_index, SenderId(0), authority, &reason).await?;
        let outcome = match report.outcome {
            RedactOutcome::Erased => "erased",
            RedactOutcome::AlreadyErased => "already_erased",
        };
        Ok::<_, ApiError>(json(&RedactDone {
            log_index: report.log_index,
            epoch: report.epoch,
            erased_at_ms: report.erased_at_ms,
            outcome: outcome.to_owned(),
            audit: report.audit,
        }))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v1/rooms/{room_id}/retention`, and the answer to changing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionView {
    /// The room.
    pub room_id: String,
    /// Entries older than this (ms) are erased; absent: kept until redacted.
    pub retention_ms: Option<u64>,
    /// Entries below this index have been swept (absent without a period).
    pub swept_next_log_index: Option<u64>,
    /// The audit record of the change (only in the answer to a change).
    pub audit: Option<AuditRecord>,
}

/// Body of `PUT /v1/rooms/{room_id}/retention`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionBody {
    /// The period, ms (at least the server's minimum).
    pub retention_ms: u64,
}

/// The room's retention view, after checking the room exists.
async fn retention_of(api: &AdminApi, room_id: RoomId) -> Result<RetentionView, ApiError> {
    if api.node.room_info(room_id).await.is_none() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_room", format!("no room {room_id}")));
    }
    let retention = api.node.retention(room_id).await?;
    Ok(RetentionView {
        room_id: room_id.to_string(),
        retention_ms: retention.map(|r| r.retention_ms),
        swept_next_log_index: retention.map(|r| r.swept_next_log_index),
        audit: None,
    })
}

async fn show_retention(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> Response {
    let result = async {
        let api = api(&state)?;
        api.authorize(&headers, Scope::Read)?;
        let view = retention_of(api, parse_room(&room)?).await?;
        Ok::<_, ApiError>(json(&view))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn change_retention(
    api: &AdminApi,
    room_id: RoomId,
    retention_ms: Option<u64>,
) -> Result<Response, ApiError> {
    let record = api.node.set_retention(room_id, retention_ms).await?;
    let mut view = retention_of(api, room_id).await?;
    view.audit = Some(record);
    Ok(json(&view))
}

async fn set_retention(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(room): Path<String>,
    body: Bytes,
) -> Response {
    let result = async {
        let api = api(&state)?;
        api.authorize(&headers, Scope::Operator)?;
        let room_id = parse_room(&room)?;
        let body: RetentionBody = parse_body(&headers, &body)?;
        change_retention(api, room_id, Some(body.retention_ms)).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn clear_retention(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> Response {
    let result = async {
        let api = api(&state)?;
        api.authorize(&headers, Scope::Operator)?;
        change_retention(api, parse_room(&room)?, None).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Reads the whole audit log (at most [`AUDIT_EXPORT_RECORDS_MAX`] records
/// from `from`) with its head.
pub fn export_audit(store: &dyn Store, from: u64, limit: usize) -> Result<AuditExport, String> {
    let limit = limit.min(AUDIT_EXPORT_RECORDS_MAX);
    let head = store.audit_head().map_err(|error| error.to_string())?;
    let mut records = Vec::new();
    let mut next = from;
    while records.len() < limit {
        let page = store
            .audit_records(next, (limit - records.len()).min(AUDIT_PAGE_RECORDS_MAX))
            .map_err(|error| error.to_string())?;
        let Some((last, _)) = page.last() else { break };
        next = last.saturating_add(1);
        for (_, bytes) in page {
            records.push(AuditRecord::decode(&bytes).map_err(|error| error.to_string())?);
        }
        if next == 0 {
            break;
        }
    }
    Ok(AuditExport { head: head.map(ExportedHead::from), records })
}

/// Verifies the store's audit log, every record from the first, against its head.
pub fn verify_store(
    store: &dyn Store,
) -> Result<Result<audit::AuditVerified, audit::AuditVerifyError>, String> {
    let head = store.audit_head().map_err(|error| error.to_string())?;
    let mut verifier = AuditVerifier::default();
    let mut next = 0u64;
    loop {
        let page = store.audit_records(next, AUDIT_PAGE_RECORDS_MAX).map_err(|error| error.to_string())?;
        let Some((last, _)) = page.last() else { break };
        let last = *last;
        for (_, bytes) in &page {
            if let Err(error) = verifier.push_encoded(bytes) {
                return Ok(Err(error));
            }
        }
        match last.checked_add(1) {
            Some(following) => next = following,
            None => break,
        }
    }
    Ok(verifier.finish(head))
}

async fn audit_export(
    State(state): State<AdminState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let result = async {
        let api = api(&state)?;
        api.authorize(&headers, Scope::Read)?;
        let query = parse_query(query.as_deref())?;
        let from = query_number(&query, "from", 0, u64::MAX)?;
        let max = u64::try_from(AUDIT_EXPORT_RECORDS_MAX).unwrap_or(u64::MAX);
        let limit =
            usize::try_from(query_number(&query, "limit", max, max)?).unwrap_or(AUDIT_EXPORT_RECORDS_MAX);
        let store = Arc::clone(api.node.store());
        let export = tokio::task::spawn_blocking(move || export_audit(store.as_ref(), from, limit))
            .await
            .map_err(|error| error.to_string())
            .and_then(|result| result)
            .map_err(|error| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", error))?;
        Ok::<_, ApiError>(json(&export))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v1/audit/verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyView {
    /// Whether the chain is intact.
    pub valid: bool,
    /// Records checked (up to the break, if any).
    pub records: u64,
    /// The head recorded by the store.
    pub head: Option<ExportedHead>,
    /// What is broken.
    pub error: Option<String>,
}

async fn audit_verify(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    let result = async {
        let api = api(&state)?;
        api.authorize(&headers, Scope::Read)?;
        let store = Arc::clone(api.node.store());
        let outcome = tokio::task::spawn_blocking(move || {
            let head = store.audit_head().map_err(|error| error.to_string())?;
            verify_store(store.as_ref()).map(|verified| (head, verified))
        })
        .await
        .map_err(|error| error.to_string())
        .and_then(|result| result)
        .map_err(|error| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", error))?;
        let (head, verified) = outcome;
        let view = match verified {
            Ok(verified) => VerifyView {
                valid: true,
                records: verified.records,
                head: head.map(ExportedHead::from),
                error: None,
            },
            Err(error) => VerifyView {
                valid: false,
                records: 0,
                head: head.map(ExportedHead::from),
                error: Some(error.to_string()),
            },
        };
        Ok::<_, ApiError>(json(&view))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The backup directory, and whether a backup is being written into it.
#[derive(Debug, Clone)]
struct BackupTarget {
    dir: std::path::PathBuf,
    running: Arc<std::sync::atomic::AtomicBool>,
}

/// Marks a backup as running until dropped.
struct BackupRunning(Arc<std::sync::atomic::AtomicBool>);

impl BackupTarget {
    /// Claims the directory for one backup, or answers 409 `backup_in_progress`.
    fn claim(&self) -> Result<BackupRunning, ApiError> {
        use std::sync::atomic::Ordering;
        self.running.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).map_err(|_| {
            ApiError::new(StatusCode::CONFLICT, "backup_in_progress", "another backup is being written")
        })?;
        Ok(BackupRunning(Arc::clone(&self.running)))
    }
}

impl Drop for BackupRunning {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

impl From<BackupError> for ApiError {
    fn from(error: BackupError) -> ApiError {
        let message = error.to_string();
        let (status, code) = match &error {
            BackupError::InvalidName { .. } => (StatusCode::BAD_REQUEST, "invalid_backup_name"),
            BackupError::Exists { .. } => (StatusCode::CONFLICT, "backup_exists"),
            BackupError::Unsupported => (StatusCode::CONFLICT, "backup_not_configured"),
            BackupError::Storage(_) | BackupError::NotVerified { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "backup_failed")
            }
            BackupError::UnknownTable { .. } | BackupError::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, message)
    }
}

/// Body of `POST /v1/backup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupBody {
    /// File name of the copy in the backup directory (no path).
    pub name: String,
}

/// The answer to `POST /v1/backup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupDone {
    /// The file name.
    pub name: String,
    /// The file, in the backup directory.
    pub path: String,
    /// Its size.
    pub bytes: u64,
    /// Rows copied over every table.
    pub rows: u64,
    /// Rooms in the copy.
    pub rooms: u64,
    /// Log entries in the copy.
    pub log_entries: u64,
    /// The audit log's head in the copy.
    pub audit_head: Option<ExportedHead>,
    /// Time taken, ms.
    pub duration_ms: u64,
}

/// `POST /v1/backup`: a consistent copy of the database, written while the
/// server runs ([`crate::store::backup`]). Operator only.
async fn backup(State(state): State<AdminState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        let api = api(&state)?;
        api.authorize(&headers, Scope::Operator)?;
        let BackupBody { name } = parse_body(&headers, &body)?;
        check_backup_name(&name)?;
        let target = api.backup.as_ref().ok_or_else(|| {
            ApiError::new(StatusCode::CONFLICT, "backup_not_configured", "the server has no backup_dir")
        })?;
        let running = target.claim()?;
        let (store, dir, file_name) = (Arc::clone(api.node.store()), target.dir.clone(), name.clone());
        // The claim moves into the task: a client that hangs up does not
        // let a second backup start while this one is still writing.
        let report = tokio::task::spawn_blocking(move || {
            let _running = running;
            write_backup(store.as_ref(), &dir, &file_name)
        })
        .await
        .map_err(|error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", error.to_string()))??;
        tracing::info!(
            path = %report.path.display(),
            bytes = report.bytes,
            log_entries = report.copy.log_entries,
            duration_ms = report.duration_ms,
            "backup written"
        );
        Ok::<_, ApiError>(json(&BackupDone {
            name,
            path: report.path.display().to_string(),
            bytes: report.bytes,
            rows: report.copy.rows,
            rooms: report.copy.rooms,
            log_entries: report.copy.log_entries,
            audit_head: report.copy.audit_head.map(ExportedHead::from),
            duration_ms: report.duration_ms,
        }))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_moderation_failure_has_a_status_and_a_stable_code() {
        let cases = [
            (ModerationFailure::UnknownRoom, 404, "unknown_room"),
            (ModerationFailure::NotMember(SenderId(1)), 404, "unknown_member"),
            (ModerationFailure::RemovalPending(SenderId(1)), 409, "removal_pending"),
            (ModerationFailure::NotBanned(SenderId(1)), 409, "not_banned"),
            (ModerationFailure::Refused(ModerationError::RoleHeld), 409, "role_held"),
            (ModerationFailure::Refused(ModerationError::RoleNotHeld), 409, "role_not_held"),
            (ModerationFailure::Refused(ModerationError::AdminRoleFixed), 409, "admin_role_fixed"),
            (ModerationFailure::Refused(ModerationError::TooManyRoles), 409, "limit_reached"),
            (ModerationFailure::Sequencer(SubmitError::TooManyBans), 409, "limit_reached"),
            (ModerationFailure::Sequencer(SubmitError::TooManyServerProposals), 409, "limit_reached"),
            (ModerationFailure::Refused(ModerationError::Forbidden("no")), 403, "insufficient_scope"),
            (ModerationFailure::Busy, 429, "busy"),
            (ModerationFailure::Sequencer(SubmitError::Overloaded { in_flight: 1 }), 429, "busy"),
            (ModerationFailure::Stopped, 503, "shutting_down"),
            (ModerationFailure::Storage("disk".into()), 503, "storage_unavailable"),
            (ModerationFailure::Sequencer(SubmitError::Recovering), 503, "storage_unavailable"),
        ];
        let documented: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
        let codes = documented["components"]["schemas"]["Error"]["properties"]["code"]["enum"].clone();
        for (failure, status, code) in cases {
            let error = ApiError::from(failure.clone());
            assert_eq!((error.status.as_u16(), error.code), (status, code), "{failure:?}");
            assert!(codes.as_array().unwrap().iter().any(|c| c == code), "{code} is documented");
        }
    }

    #[test]
    fn every_erasure_failure_has_a_status_and_a_stable_code() {
        let room_id = RoomId([1; 16]);
        let violation = crate::store::InvariantViolation("bug".into());
        let failure = crate::store::StorageFailure::new("redact", std::io::Error::other("disk"));
        let redactions = [
            (RedactError::UnknownRoom { room_id }, 404, "unknown_room"),
            (RedactError::UnknownLogIndex { log_index: 9, next_log_index: 3 }, 404, "unknown_log_index"),
            (RedactError::NotErasable { log_index: 0, opcode: 0x0100 }, 409, "not_erasable"),
            (RedactError::Storage("disk".into()), 503, "storage_unavailable"),
            (RedactError::Internal("bug".into()), 500, "internal"),
        ];
        let retentions = [
            (RetentionError::UnknownRoom { room_id }, 404, "unknown_room"),
            (
                RetentionError::PeriodTooShort { retention_ms: 1, retention_ms_min: 2 },
                400,
                "malformed_request",
            ),
            (RetentionError::Storage(failure), 503, "storage_unavailable"),
            (RetentionError::Internal(violation), 500, "internal"),
        ];
        let documented: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
        let codes = documented["components"]["schemas"]["Error"]["properties"]["code"]["enum"].clone();
        let answers = redactions
            .into_iter()
            .map(|(error, status, code)| (ApiError::from(error), status, code))
            .chain(retentions.into_iter().map(|(error, status, code)| (ApiError::from(error), status, code)));
        for (error, status, code) in answers {
            assert_eq!((error.status.as_u16(), error.code), (status, code), "{error:?}");
            assert!(codes.as_array().unwrap().iter().any(|c| c == code), "{code} is documented");
        }
    }

    #[test]
    fn every_backup_failure_has_a_status_and_a_documented_code() {
        let failure = crate::store::StorageFailure::new("backup", std::io::Error::other("disk full"));
        let cases = [
            (BackupError::InvalidName { name: "../x".into() }, 400, "invalid_backup_name"),
            (BackupError::Exists { path: "/b/x".into() }, 409, "backup_exists"),
            (BackupError::Unsupported, 409, "backup_not_configured"),
            (BackupError::Storage(failure), 500, "backup_failed"),
            (BackupError::NotVerified { path: "/b/.x.partial".into() }, 500, "backup_failed"),
            (BackupError::UnknownTable { name: "t".into() }, 500, "internal"),
        ];
        let documented: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
        let codes = documented["components"]["schemas"]["Error"]["properties"]["code"]["enum"].clone();
        let responses = &documented["paths"]["/v1/backup"]["post"]["responses"];
        for (error, status, code) in cases {
            let error = ApiError::from(error);
            assert_eq!((error.status.as_u16(), error.code), (status, code), "{error:?}");
            assert!(codes.as_array().unwrap().iter().any(|c| c == code), "{code} is documented");
            assert!(responses[status.to_string()]["description"].as_str().unwrap().contains(code));
        }
        let in_progress = BackupTarget { dir: "/b".into(), running: Arc::default() };
        let claim = in_progress.claim().unwrap();
        assert_eq!(in_progress.claim().err().map(|error| error.code), Some("backup_in_progress"));
        drop(claim);
        assert!(in_progress.claim().is_ok(), "the claim ends with the backup");
    }

    #[test]
    fn ids_and_roles_parse_strictly() {
        assert_eq!(parse_room(&"ab".repeat(16)).unwrap(), RoomId([0xab; 16]));
        assert!(parse_room("ab").is_err() && parse_room(&"zz".repeat(16)).is_err());
        assert_eq!(parse_user("00000000000000ff").unwrap(), SenderId(255));
        assert!(parse_user("ff").is_err() && parse_user("+000000000000000").is_err());
        assert!(parse_user("00000000000000FF").is_err() && parse_room(&"AB".repeat(16)).is_err());
        assert_eq!(
            parse_reason(Some("é".repeat(REASON_CHARS_MAX))).unwrap().chars().count(),
            REASON_CHARS_MAX
        );
        assert!(parse_reason(Some("a".repeat(REASON_CHARS_MAX + 1))).is_err());
        let query = parse_query(Some("limit=+5&from=07")).unwrap();
        assert!(query_number(&query, "limit", 0, 10).is_err());
        assert_eq!(query_number(&query, "from", 0, 10).unwrap(), 7);
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("BEARER abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(parse_role("moderator").unwrap(), Role::Moderator);
        assert!(parse_role("Moderator").is_err());
        assert!(same(&[1; 32], &[1; 32]) && !same(&[1; 32], &[2; 32]));
    }
}
