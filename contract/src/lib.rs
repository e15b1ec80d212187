//! The contract between Sendense's operator and its agent, defined once for both sides.
//!
//! The operator builds every `sendense-agent` command line from the [`cli`] structs the agent
//! parses, and reads the agent's answers ([`result`], [`progress`], [`probe`], [`prune`])
//! through the same types the agent writes. A field renamed on one side fails to compile on the other instead of
//! silently reading as zero.

pub mod cli;
pub mod manifest;
pub mod probe;
pub mod progress;
pub mod prune;
pub mod reason;
pub mod restore;
pub mod result;

pub use reason::{AgentReason, ProbeReason};
