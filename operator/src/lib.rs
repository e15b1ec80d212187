//! Sendense's operator. So far its pure decision steps, each unit-tested: which ports a job's
//! hub gets (`ports`) and which earlier backup each disk is layered on (`chain`). The
//! controllers that apply them arrive with the rest of the operator.

pub mod chain;
pub mod ports;
