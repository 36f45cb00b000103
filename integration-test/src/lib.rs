//! Helpers for the end-to-end tests: the real observer binary as a child
//! process, and its metrics as the test sees them.
//!
//! The tests need root and a kernel that loads eBPF. Where either is missing
//! they fail with the observer's own error message: they never skip.

pub mod container;
pub mod kube_api;
mod metrics;
pub mod observer;
pub mod prometheus;

pub use kube_api::FakeApi;
pub use metrics::Scrape;
pub use observer::Observer;
pub use prometheus::Prometheus;
