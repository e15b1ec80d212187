//! delay-proxy: a TCP proxy that holds every byte for a fixed time in each direction without
//! limiting bandwidth — added round-trip time for benchmarks (this kernel has no netem).
//!
//! `delay-proxy --listen 127.0.0.1:20000 --upstream 127.0.0.1:10100 --delay-ms 10`

use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    listen: String,
    #[arg(long)]
    upstream: String,
    /// Delay added in each direction (so the round trip grows by twice this).
    #[arg(long, default_value_t = 10)]
    delay_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let delay = Duration::from_millis(args.delay_ms);
    let listener = TcpListener::bind(&args.listen).await?;
    eprintln!(
        "delay-proxy: {} -> {} (+{:?} each way)",
        args.listen, args.upstream, delay
    );
    loop {
        let (client, _) = listener.accept().await?;
        let upstream = args.upstream.clone();
        tokio::spawn(async move {
            let server =
                match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&upstream))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return eprintln!("delay-proxy: connecting to {upstream}: {e}"),
                    Err(_) => return eprintln!("delay-proxy: connecting to {upstream} timed out"),
                };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(pipe(cr, sw, delay), pipe(sr, cw, delay));
        });
    }
}

/// Reads as fast as data comes and writes each piece once it is `delay` old: latency is added,
/// throughput is not limited (the queue holds up to one delay's worth of traffic).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
