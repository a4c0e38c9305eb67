//! The admin listener's route table: the router, the request counter and
//! the OpenAPI document all follow it.

/// Every route of the admin listener, as (method, path); the router is
/// built from this table and the OpenAPI document lists exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/rooms"),
    ("GET", "/v1/rooms/{room_id}"),
    ("GET", "/v1/rooms/{room_id}/members"),
    ("POST", "/v1/rooms/{room_id}/roles"),
    ("DELETE", "/v1/rooms/{room_id}/roles/{user_id}/{role}"),
    ("POST", "/v1/rooms/{room_id}/kick"),
    ("POST", "/v1/rooms/{room_id}/bans"),
    ("DELETE", "/v1/rooms/{room_id}/bans/{user_id}"),
    ("POST", "/v1/rooms/{room_id}/redact"),
    ("GET", "/v1/rooms/{room_id}/retention"),
    ("PUT", "/v1/rooms/{room_id}/retention"),
    ("DELETE", "/v1/rooms/{room_id}/retention"),
    ("GET", "/v1/audit/export"),
    ("GET", "/v1/audit/verify"),
    ("POST", "/v1/backup"),
    ("GET", "/v1/federation"),
];
