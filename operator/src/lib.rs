//! Sendense's operator. So far its pure steps, each unit-tested: which ports a job's hub gets
//! (`ports`), which earlier backup each disk is layered on (`chain`), and the hub pod and
//! Service (`hub`) and the agent pod (`agent`) built from those decisions. The controllers that apply them arrive with the
//! rest of the operator.

pub mod agent;
pub mod chain;
pub mod hub;
pub mod metrics;
pub mod ports;
pub mod source_node;
