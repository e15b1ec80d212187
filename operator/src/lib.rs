//! Sendense's operator. So far its pure steps, each unit-tested: which ports a job's hub gets
//! (`ports`), which earlier backup each disk is layered on (`chain`), and the hub pod and
//! Service built from those decisions (`hub`). The controllers that apply them arrive with the
//! rest of the operator.

pub mod chain;
pub mod hub;
pub mod ports;
