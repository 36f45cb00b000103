//! observer: counts the traffic inside pod network namespaces with eBPF,
//! serves it as Prometheus metrics, and enforces traffic policies.
//!
//! The layers, each depending only on those listed after it:
//!
//! - [`run`]: `observer run`, wiring the layers below together;
//! - [`cli`]: the command line, its configuration file, and `observer
//!   flows`' view (the binary's `main.rs` dispatches the commands);
//! - [`endpoint`]: the HTTP server (`/metrics`, `/flows`, probes);
//! - [`pods`]: where pods come from (a directory, an inventory, the
//!   Kubernetes API) and keeping what is attached in step with them;
//! - [`flows`]: from the kernel's flow map to series, metrics and `/flows`;
//! - [`policy`]: the policy file, compiled into the kernel's entries;
//! - [`kernel`]: loading and attaching the eBPF programs, writing their maps;
//! - [`names`], [`metrics`]: ids and names, the observer's own metrics.
//!
//! Kernel and daemon share their vocabulary and their two decisions (how a
//! connection's other end is classified, how rules decide it) through
//! `observer-common`.

pub mod cli;
pub mod endpoint;
pub mod flows;
pub mod kernel;
pub mod metrics;
pub mod names;
pub mod pods;
pub mod policy;
pub mod run;
