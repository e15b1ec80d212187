//! The NBD client against real servers: qemu-nbd (raw and QCOW2, multi-conn or not) and nbdkit
//! (with its delay and error filters for faults), over real Unix sockets.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sendense_agent::nbd::{ConnectOptions, NbdClient, NbdError, NbdUrl, proto};

mod support;
use support::*;

#[tokio::test]
async fn negotiates_with_qemu_nbd_and_honours_multi_conn() -> Result<()> {
    let s = Scratch::new("negotiate");
    raw_file(&s.path("disk.raw"), 64 << 20)?;
    let shared = qemu_nbd(
        &s.path("disk.raw"),
        &s.path("a.sock"),
        "raw",
        &["--shared=8"],
    )?;
    let c = NbdClient::connect(&shared.url(""), &opts()).await?;
    assert_eq!(c.size(), 64 << 20);
    assert!(c.structured_replies());
    assert!(c.can_block_status());
    assert!(c.can_write_zeroes() && c.can_flush());
    assert!(
        c.can_multi_conn(),
        "qemu-nbd advertises multi-conn when --shared > 1"
    );
    assert_eq!(c.connections(), 4);
    assert_eq!(c.block_size().maximum, 32 << 20);
    c.disconnect().await;

    // A server that takes fewer clients than we would like: we use what it takes.
    let capped = qemu_nbd(
        &s.path("disk.raw"),
        &s.path("c.sock"),
        "raw",
        &["--shared=2"],
    )?;
    let c = NbdClient::connect(&capped.url(""), &opts()).await?;
    assert_eq!(c.connections(), 2);
    c.write(8192, pattern(2, 4096)).await?;
    assert_eq!(c.read(8192, 4096).await?, pattern(2, 4096));
    c.disconnect().await;

    // --shared=1 (qemu-nbd's default): no multi-conn, so exactly one connection and no hang.
    let single = qemu_nbd(
        &s.path("disk.raw"),
        &s.path("b.sock"),
        "raw",
        &["--shared=1"],
    )?;
    let c = NbdClient::connect(&single.url(""), &opts()).await?;
    assert!(!c.can_multi_conn());
    assert_eq!(c.connections(), 1);
    c.write(0, pattern(1, 4096)).await?;
    assert_eq!(c.read(0, 4096).await?, pattern(1, 4096));
    Ok(())
}

#[tokio::test]
async fn many_concurrent_writes_land_where_they_should() -> Result<()> {
    let s = Scratch::new("concurrent");
    let file = s.path("disk.raw");
    raw_file(&file, 256 << 20)?;
    let server = qemu_nbd(&file, &s.path("s.sock"), "raw", &["--shared=8"])?;
    let c = NbdClient::connect(&server.url(""), &opts()).await?;
    // 256 writes of 256 KiB, all in flight at once across 4 connections, in shuffled order.
    let chunk = 256 * 1024usize;
    let mut order: Vec<u64> = (0..256).collect();
    order.sort_by_key(|i| (i * 7919) % 256);
    let writes = order
        .iter()
        .map(|&i| c.write(i * 1024 * 1024, pattern(i, chunk)));
    for r in futures_join_all(writes).await {
        r?;
    }
    c.flush().await?;
    // Read back through NBD, and independently from the file itself.
    let reads = (0..256u64).map(|i| c.read(i * 1024 * 1024, chunk as u32));
    for (i, r) in futures_join_all(reads).await.into_iter().enumerate() {
        assert_eq!(r?, pattern(i as u64, chunk), "NBD read of block {i}");
    }
    c.disconnect().await;
    let disk = std::fs::read(&file)?;
    for i in 0..256usize {
        let at = i * 1024 * 1024;
        assert_eq!(
            &disk[at..at + chunk],
            &pattern(i as u64, chunk)[..],
            "file content of block {i}"
        );
        assert!(
            disk[at + chunk..at + 1024 * 1024].iter().all(|b| *b == 0),
            "gap after block {i} untouched"
        );
    }
    Ok(())
}

async fn futures_join_all<F: std::future::Future>(
    it: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let handles: Vec<_> = it.into_iter().collect();
    let mut out = Vec::with_capacity(handles.len());
    // Poll all concurrently on this task.
    let mut pinned: Vec<_> = handles.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if results[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => results[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.extend(results.into_iter().map(|r| r.expect("completed")));
    out
}

#[tokio::test]
async fn block_status_and_structured_reads_see_holes() -> Result<()> {
    let s = Scratch::new("holes");
    let file = s.path("disk.raw");
    raw_file(&file, 16 << 20)?;
    let server = qemu_nbd(&file, &s.path("s.sock"), "raw", &["--shared=8"])?;
    let c = NbdClient::connect(&server.url(""), &opts()).await?;
    c.write(4 << 20, pattern(9, 1 << 20)).await?;
    c.flush().await?;
    let mut offset = 0u64;
    let mut map = Vec::new();
    while offset < c.size() {
        let len = (c.size() - offset).min(u32::MAX as u64 / 2) as u32;
        for e in c.block_status(offset, len).await? {
            map.push((offset, e.length as u64, e.flags));
            offset += e.length as u64;
        }
    }
    let data: Vec<_> = map
        .iter()
        .filter(|(_, _, f)| f & proto::STATE_HOLE == 0)
        .collect();
    assert_eq!(data.len(), 1, "one allocated extent: {map:?}");
    assert_eq!((data[0].0, data[0].1), (4 << 20, 1 << 20));
    // A read across data and hole returns the data then zeros.
    let r = c.read((5 << 20) - 4096, 8192).await?;
    assert_eq!(&r[..4096], &pattern(9, 1 << 20)[(1 << 20) - 4096..]);
    assert!(r[4096..].iter().all(|b| *b == 0));
    Ok(())
}

#[tokio::test]
async fn write_zeroes_into_a_qcow2_overlay_hides_the_parent() -> Result<()> {
    let s = Scratch::new("overlay");
    let base = s.path("base.qcow2");
    let top = s.path("top.qcow2");
    let ok = |st: std::process::ExitStatus| {
        if st.success() {
            Ok(())
        } else {
            Err(anyhow::anyhow!("qemu-img failed"))
        }
    };
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("8M")
        .status()?)?;
    {
        let server = qemu_nbd(&base, &s.path("base.sock"), "qcow2", &["--shared=8"])?;
        let c = NbdClient::connect(&server.url(""), &opts()).await?;
        c.write(0, pattern(3, 8 << 20)).await?;
        c.flush().await?;
        c.disconnect().await;
    }
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&top)
        .status()?)?;
    let server = qemu_nbd(&top, &s.path("top.sock"), "qcow2", &["--shared=8"])?;
    let c = NbdClient::connect(&server.url(""), &opts()).await?;
    assert_eq!(
        c.read(1 << 20, 4096).await?,
        pattern(3, 8 << 20).slice(1 << 20..(1 << 20) + 4096),
        "reads fall through to the parent"
    );
    c.write_zeroes(1 << 20, 2 << 20, false).await?;
    c.flush().await?;
    let r = c.read(1 << 20, 2 << 20).await?;
    assert!(
        r.iter().all(|b| *b == 0),
        "zeroed range must not show the parent's data"
    );
    assert_eq!(
        c.read(0, 4096).await?,
        pattern(3, 8 << 20).slice(0..4096),
        "outside the range the parent shows"
    );
    Ok(())
}

#[tokio::test]
async fn a_server_that_stops_answering_fails_within_the_deadline() -> Result<()> {
    let s = Scratch::new("deadline");
    // nbdkit's delay filter holds every read for 30 s: far past the 1 s request deadline.
    let server = nbdkit(
        &s.path("s.sock"),
        &["--filter=delay", "memory", "size=16M", "rdelay=30"],
    )?;
    let o = ConnectOptions {
        request_timeout: Duration::from_secs(1),
        connections: 1,
        ..opts()
    };
    let c = NbdClient::connect(&server.url(""), &o).await?;
    let started = Instant::now();
    let err = c.read(0, 4096).await.expect_err("the read must time out");
    assert!(matches!(err, NbdError::Timeout { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // The connection is dead now: later requests fail at once instead of queueing forever.
    let started = Instant::now();
    let err = c
        .write(0, pattern(1, 4096))
        .await
        .expect_err("dead connection");
    assert!(started.elapsed() < Duration::from_secs(2), "{err}");
    Ok(())
}

#[tokio::test]
async fn connect_has_a_deadline_and_names_what_failed() -> Result<()> {
    // A listener that accepts and then says nothing: negotiation must not wait forever.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let _hold = std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(10));
        drop(held);
    });
    let url: NbdUrl = format!("nbd://127.0.0.1:{port}/x").parse()?;
    let o = ConnectOptions {
        connect_timeout: Duration::from_millis(500),
        ..opts()
    };
    let started = Instant::now();
    let err = NbdClient::connect(&url, &o)
        .await
        .err()
        .context("must fail")?;
    assert!(matches!(err, NbdError::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // Nobody listening: a connect error naming the address.
    // Port 1 (tcpmux): privileged and unused, so nothing listens there, and no other process
    // can take it the way it can take a port found free a moment earlier.
    let free = 1;
    let url: NbdUrl = format!("nbd://127.0.0.1:{free}/x").parse()?;
    let err = NbdClient::connect(&url, &o)
        .await
        .err()
        .context("must fail")?;
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{free}")),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn server_errors_and_unknown_exports_are_reported() -> Result<()> {
    let s = Scratch::new("errors");
    let server = nbdkit(
        &s.path("s.sock"),
        &[
            "--filter=error",
            "memory",
            "size=16M",
            "error-pread=EIO",
            "error-pread-rate=100%",
        ],
    )?;
    let c = NbdClient::connect(&server.url(""), &opts()).await?;
    let err = c.read(0, 4096).await.expect_err("reads fail");
    assert!(matches!(err, NbdError::Server { errno: 5, .. }), "{err}");
    // The connection survives a server error.
    c.write(0, pattern(2, 4096)).await?;

    let file = s.path("d.raw");
    raw_file(&file, 1 << 20)?;
    let named = qemu_nbd(
        &file,
        &s.path("n.sock"),
        "raw",
        &["-x", "disk-2000", "--shared=8"],
    )?;
    let err = NbdClient::connect(&named.url("disk-2001"), &opts())
        .await
        .err()
        .context("unknown export")?;
    assert!(err.to_string().contains("disk-2001"), "{err}");
    let ok = NbdClient::connect(&named.url("disk-2000"), &opts()).await?;
    assert_eq!(ok.size(), 1 << 20);

    let ro = qemu_nbd(&file, &s.path("ro.sock"), "raw", &["-r", "--shared=8"])?;
    let c = NbdClient::connect(&ro.url(""), &opts()).await?;
    assert!(matches!(
        c.write(0, pattern(1, 512)).await,
        Err(NbdError::Unsupported(_))
    ));
    assert!(
        matches!(c.read(1 << 20, 1).await, Err(NbdError::Range(_))),
        "past the end is refused locally"
    );
    Ok(())
}

#[tokio::test]
async fn killing_the_server_fails_requests_in_flight_promptly() -> Result<()> {
    let s = Scratch::new("kill");
    let mut server = nbdkit(
        &s.path("s.sock"),
        &["--filter=delay", "memory", "size=64M", "wdelay=2"],
    )?;
    let c = NbdClient::connect(&server.url(""), &opts()).await?;
    let writes = futures_join_all((0..32u64).map(|i| c.write(i * 65536, pattern(i, 65536))));
    let killer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = server.child.kill();
    };
    let started = Instant::now();
    let (results, ()) = tokio::join!(writes, killer);
    assert!(
        results.iter().all(|r| r.is_err()),
        "every in-flight write fails"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed promptly: {:?}",
        started.elapsed()
    );
    let msg = results[0]
        .as_ref()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("closed"), "{msg}");
    Ok(())
}
