//! Sendense's operator: controllers for SourceNode (vCenter probes), Repository (volume probes)
//! and BackupJob (the data flow of one backup), built on pure, unit-tested steps: which ports a
//! job's hub gets (`ports`), which earlier backup each disk is layered on (`chain`), and the hub
//! pod and Service (`hub`) and the agent pod (`agent`) built from those decisions.

pub mod agent;
pub mod backup_job;
pub mod chain;
pub mod events;
pub mod hub;
pub mod metrics;
pub mod ports;
pub mod repository;
pub mod source_node;
