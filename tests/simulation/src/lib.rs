//! Simulation tests of Kalandra: the fixed seeds, the determinism checks
//! and the injected-bug tests live in `tests/`; the simulation itself is the
//! `kalandra-harness` crate.
#![forbid(unsafe_code)]
