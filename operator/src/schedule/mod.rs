//! BackupSchedule: BackupJobs made at cron times for the VMs a selection names at each run.

pub mod clock;
pub mod controller;
pub mod cron;
pub mod plan;
