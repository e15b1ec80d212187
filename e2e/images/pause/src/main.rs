//! pause: the process of a pod's sandbox container. It holds the pod's namespaces, so it must
//! do nothing for as long as the pod lives: it waits for SIGTERM or SIGINT and exits 0, and as
//! PID 1 of a pod that shares its process namespace it reaps every orphan that is re-parented
//! to it. Signals are blocked and taken with sigwaitinfo: a blocked signal is delivered even to
//! PID 1 of a namespace, where a signal left at its default action would be dropped.

use std::process::ExitCode;

fn reap_children() {
    loop {
        // SAFETY: waitpid with a null status pointer only reaps.
        let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
    }
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("-v") {
        println!("pause (sendense) {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    // SAFETY: a zeroed sigset_t is then initialised by sigemptyset; every call gets valid
    // pointers into this stack frame.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGCHLD] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            eprintln!("pause: cannot block signals");
            return ExitCode::FAILURE;
        }
        loop {
            match libc::sigwaitinfo(&set, std::ptr::null_mut()) {
                libc::SIGCHLD => reap_children(),
                libc::SIGTERM | libc::SIGINT => {
                    reap_children();
                    return ExitCode::SUCCESS;
                }
                // EINTR (a stop/continue) or a signal we did not ask for: keep waiting.
                _ => {}
            }
        }
    }
}
