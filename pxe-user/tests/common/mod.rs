//! Helpers shared by the integration tests.
#![allow(dead_code, reason = "each test binary uses its own subset of the helpers")]

pub mod frames;
