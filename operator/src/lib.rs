//! Sendense's operator. Three controllers, each a module no other controller imports:
//! `source_node` (vCenter probes), `repository` (volume probes) and `backup_job` (the data flow
//! of one backup, a directory of steps). What they share lives in modules no controller owns:
//! the objects they create (`resources`, pure builders), writing them (`children`), reading pods
//! (`pod_state`), the status + conditions + Events writer (`status`), vCenter logins
//! (`vcenter`), the agent's progress endpoint (`agent_progress`), and pure decisions (`chain`,
//! `ports`). What the operator and the agent say to each other is the `sendense_contract` crate. `settings` and `runtime` start it all.

pub mod agent_progress;
pub mod backup_job;
pub mod chain;
pub mod children;
pub mod metrics;
pub mod nbd_tls;
pub mod pod_state;
pub mod ports;
pub mod repository;
pub mod resources;
pub mod restore_job;
pub mod restore_point;
pub mod retention;
pub mod runtime;
pub mod schedule;
pub mod settings;
pub mod source_node;
pub mod source_policy;
pub mod status;
pub mod throttle;
pub mod vcenter;
pub mod vm_lease;

#[cfg(test)]
mod fixtures;
