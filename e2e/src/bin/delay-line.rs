//! delay-line: a point-to-point IP link between two network namespaces through two TUN
//! devices, with a fixed one-way delay, a bandwidth cap and a drop-tail queue — what netem
//! would do, for a kernel without netem. Unlike a TCP proxy, TCP itself sees the delay: every
//! packet (data and ACK) waits, so windows, slow start and loss recovery behave as on a WAN.
//!
//! `delay-line --ns-a sd-agent --dev-a sdtun0 --ns-b sd-hub --dev-b sdtun1 --delay-ms 10
//! --rate-mbit 500` creates the devices (they vanish when it exits); the caller then gives
//! them addresses, an MTU and brings them up with `ip -n NS ...`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    ns_a: String,
    #[arg(long)]
    dev_a: String,
    #[arg(long)]
    ns_b: String,
    #[arg(long)]
    dev_b: String,
    /// One-way delay (the round trip grows by twice this).
    #[arg(long, default_value_t = 10.0)]
    delay_ms: f64,
    /// Bandwidth of each direction; 0 means unlimited.
    #[arg(long, default_value_t = 0.0)]
    rate_mbit: f64,
    /// Drop-tail queue before the link, as time at the link's rate.
    #[arg(long, default_value_t = 50.0)]
    queue_ms: f64,
}

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens a new TUN device `dev` inside network namespace `ns` (created by `ip netns add`).
fn open_tun(ns: &str, dev: &str) -> Result<File> {
    if dev.len() >= 16 {
        bail!("device name {dev:?} is too long");
    }
    let here = File::open("/proc/thread-self/ns/net")?;
    let there =
        File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("netns {ns}"))?;
    // SAFETY: setns on valid namespace fds; only this thread moves, and it moves back below.
    if unsafe { libc::setns(there.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {ns}: {}", std::io::Error::last_os_error());
    }
    let opened = (|| {
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..dev.len()].copy_from_slice(dev.as_bytes());
        // SAFETY: TUNSETIFF reads an ifreq-sized struct we own.
        if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut req) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(tun)
    })();
    // SAFETY: as above.
    unsafe { libc::setns(here.as_raw_fd(), libc::CLONE_NEWNET) };
    opened.with_context(|| format!("creating TUN {dev} in {ns}"))
}

/// Packets waiting to come out of the line, each with the time it is due.
#[derive(Default)]
struct Line {
    queue: Mutex<VecDeque<(Instant, Vec<u8>)>>,
    ready: Condvar,
}

/// Moves packets from `from` to `to`: each waits for the link to be free (at `rate` bytes/s),
/// then `delay`; a packet that would wait longer than `queue` for the link is dropped.
fn direction(mut from: File, mut to: File, delay: Duration, rate: f64, queue: Duration) {
    let line = Arc::new(Line::default());
    let out = line.clone();
    std::thread::spawn(move || {
        loop {
            let (due, packet) = {
                let mut q = out.queue.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(p) = q.pop_front() {
                        break p;
                    }
                    q = out.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let _ = to.write(&packet);
        }
    });
    let mut link_free = Instant::now();
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match from.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let now = Instant::now();
        let start = link_free.max(now);
        if rate > 0.0 {
            if start - now > queue {
                continue; // drop-tail
            }
            link_free = start + Duration::from_secs_f64(n as f64 / rate);
        } else {
            link_free = start;
        }
        let due = link_free + delay;
        line.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((due, buf[..n].to_vec()));
        line.ready.notify_one();
    }
}

fn dup(f: &File) -> Result<File> {
    // SAFETY: dup of an open fd; the new fd is owned by the returned File.
    let fd = unsafe { libc::dup(f.as_raw_fd()) };
    if fd < 0 {
        bail!("dup: {}", std::io::Error::last_os_error());
    }
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let a = open_tun(&args.ns_a, &args.dev_a)?;
    let b = open_tun(&args.ns_b, &args.dev_b)?;
    let delay = Duration::from_secs_f64(args.delay_ms / 1000.0);
    let rate = args.rate_mbit * 1e6 / 8.0;
    let queue = Duration::from_secs_f64(args.queue_ms / 1000.0);
    eprintln!(
        "delay-line: {}/{} <-> {}/{}, {:?} each way, {} Mbit/s",
        args.ns_a, args.dev_a, args.ns_b, args.dev_b, delay, args.rate_mbit
    );
    let (a2, b2) = (dup(&a)?, dup(&b)?);
    let back = std::thread::spawn(move || direction(b2, a2, delay, rate, queue));
    direction(a, b, delay, rate, queue);
    let _ = back.join();
    Ok(())
}
