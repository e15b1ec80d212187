//! Retention: which restore points of each VM a Repository (or a BackupSchedule) keeps, and the
//! pruning of the others by merging them out of their chains.

pub mod preview;
pub mod select;
