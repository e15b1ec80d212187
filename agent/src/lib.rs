//! Sendense's data mover: reads the changed blocks of a VM's disks from a vSphere snapshot and
//! writes them to the hub's QCOW2 exports over NBD.
//!
//! [`cli`] is the command line and [`cmd`] a module per subcommand; the rest is what they use:
//! [`backup`] (one backup, in steps), [`copy`] (the copy engine), [`nbd`] (the NBD client),
//! [`source`] (nbdkit exports of snapshot disks), [`hub`], [`repo`] and [`prune`] (the
//! repository side: retention's merge of a restore point out of its chain),
//! [`checksum`], [`qcow2`] (a QCOW2 chain read in process, for restores), [`qemu_nbd`] and
//! [`status`] (the backup's progress endpoint); [`guest`] (a restore point's guest file
//! systems, for file-level restore).

pub mod backup;
pub mod checksum;
pub mod cli;
pub mod cmd;
pub mod commit;
pub mod copy;
pub mod guest;
pub mod hub;
pub mod nbd;
pub mod prune;
pub mod qcow2;
pub mod qemu_nbd;
pub mod rate;
pub mod repo;
pub mod serve;
pub mod source;
pub mod status;
