//! Simulation scenarios run in the default test run (not yet built; see README status).
#![forbid(unsafe_code)]
