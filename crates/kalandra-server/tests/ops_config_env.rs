//! Environment variables sit between flags and the config file.
//!
//! This binary holds a single test because it changes the process
//! environment, which every thread shares.

use std::path::PathBuf;

use clap::Parser as _;
use kalandra_server::{CliArgs, LogFormat, ServerConfig, ADMIN_LISTEN_DEFAULT};

#[test]
fn flags_beat_environment_beats_file_beats_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("kalandra.toml");
    std::fs::write(
        &file,
        "data_dir = \"/from/file\"\nlisten = \"127.0.0.1:1111\"\nlog_filter = \"warn\"\n[limits]\nrooms_per_user_max = 3\n",
    )
    .expect("write config");

    std::env::set_var("KALANDRA_CONFIG", &file);
    std::env::set_var("KALANDRA_LISTEN", "127.0.0.1:2222");
    std::env::set_var("KALANDRA_LOG_FORMAT", "json");
    std::env::set_var("KALANDRA_LOG", "debug");
    std::env::set_var("KALANDRA_DATA_DIR", "/from/env");
    std::env::remove_var("KALANDRA_ADMIN_LISTEN");

    let cli = CliArgs::try_parse_from(["kalandra-server", "--data-dir", "/from/flag"]).expect("parse");
    assert_eq!(cli.config.as_deref(), Some(file.as_path()), "KALANDRA_CONFIG names the file");
    let config = ServerConfig::load(&cli).expect("load");
    assert_eq!(config.data_dir, PathBuf::from("/from/flag"), "flag beats environment");
    assert_eq!(config.listen.to_string(), "127.0.0.1:2222", "environment beats file");
    assert_eq!(config.log_filter, "debug", "KALANDRA_LOG beats file");
    assert_eq!(config.log_format, LogFormat::Json);
    assert_eq!(config.limits.rooms_per_user_max, 3, "file beats default");
    assert_eq!(config.admin_listen, ADMIN_LISTEN_DEFAULT, "default when nothing is set");

    std::env::set_var("KALANDRA_ADMIN_LISTEN", "not an address");
    assert!(CliArgs::try_parse_from(["kalandra-server"]).is_err(), "an invalid environment value is refused");

    for name in [
        "KALANDRA_CONFIG",
        "KALANDRA_LISTEN",
        "KALANDRA_LOG_FORMAT",
        "KALANDRA_LOG",
        "KALANDRA_DATA_DIR",
        "KALANDRA_ADMIN_LISTEN",
    ] {
        std::env::remove_var(name);
    }
}
