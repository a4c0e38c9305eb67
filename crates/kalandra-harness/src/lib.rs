//! Deterministic simulation harness for Kalandra (not yet built; see README status).
#![forbid(unsafe_code)]
