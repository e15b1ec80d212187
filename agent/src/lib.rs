//! Sendense's data mover: reads the changed blocks of a VM's disks from a vSphere snapshot and
//! writes them to the hub's QCOW2 exports over NBD.

pub mod backup;
pub mod copy;
pub mod hub;
pub mod nbd;
pub mod qemu_nbd;
pub mod repo;
pub mod source;
pub mod status;
pub mod verify;
