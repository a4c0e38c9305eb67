//! Installing the global log subscriber.
//!
//! This binary holds a single test because the subscriber is process-wide.

use kalandra_server::{init_logging, ConfigError, LogFormat};

#[test]
fn logging_installs_once_and_rejects_bad_filters() {
    match init_logging(LogFormat::Json, "info,kalandra_server=loud") {
        Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, "log_filter"),
        other => panic!("expected an invalid filter, got {other:?}"),
    }
    init_logging(LogFormat::Json, "kalandra_server=debug,info").expect("first installation");
    tracing::info!(check = true, "logging works");
    match init_logging(LogFormat::Text, "info") {
        Err(ConfigError::Logging { .. }) => {}
        other => panic!("a second subscriber must be refused, got {other:?}"),
    }
}
