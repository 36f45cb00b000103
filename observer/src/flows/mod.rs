//! Flows, from the kernel's map to `/metrics` and `/flows`: the one data
//! path of the traffic counts.
//!
//! `FLOWS` (kernel) → [`collector`] (deltas per flow) → [`series`] (what a
//! flow is counted under, named through the identities) → [`metrics`]
//! (bounded Prometheus families) and [`schema::FlowRow`]s (`/flows`). The
//! labels are declared once, in [`schema`]. The policy verdict counts take
//! the same path ([`verdicts`]). [`task`] runs it all.

pub mod cgroups;
pub mod collector;
pub mod metrics;
pub mod saved;
pub mod schema;
pub mod series;
pub mod task;
pub mod verdicts;
