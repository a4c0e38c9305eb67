//! The operator's HTTP surface and metrics (driver).

pub mod api;
pub mod http;
pub mod metrics;
pub mod routes;
