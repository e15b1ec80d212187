//! NBD over TLS against a real qemu-nbd with x509 credentials and `--tls-authz`: only the
//! client certificate the server names is served; a plain client, a certificate of the same CA
//! for another identity, a server certificate for another name and a foreign CA all fail, each
//! with a message that says which.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use sendense_agent::nbd::{ConnectOptions, NbdClient, NbdUrl, TlsClient};

mod support;
use support::tls::Ca;
use support::*;

fn tls_opts(dir: &Path) -> Result<ConnectOptions> {
    Ok(ConnectOptions {
        tls: Some(TlsClient::from_dir(dir)?),
        ..opts()
    })
}

fn tls_url(socket: &Path, name: &str) -> NbdUrl {
    format!(
        "nbds+unix:///?socket={}&tls-hostname={name}",
        socket.display()
    )
    .parse()
    .expect("valid url")
}

/// The error of a connection that must fail.
async fn refused(url: &NbdUrl, opts: &ConnectOptions) -> String {
    match NbdClient::connect(url, opts).await {
        Ok(c) => {
            c.disconnect().await;
            panic!("{url:?} was served")
        }
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn only_the_named_client_certificate_is_served_over_tls() -> Result<()> {
    let s = Scratch::new("tls");
    let ca = Ca::new("sendense test CA")?;
    ca.issue(&s.path("server"), "server", "web-hub.ns.svc")?;
    ca.issue(&s.path("agent"), "client", "sendense-agent.job-a")?;
    ca.issue(&s.path("other-job"), "client", "sendense-agent.job-b")?;
    let foreign = Ca::new("another CA")?;
    foreign.issue(&s.path("foreign"), "client", "sendense-agent.job-a")?;
    run(Command::new("qemu-img")
        .args(["create", "-f", "qcow2"])
        .arg(s.path("d.qcow2"))
        .arg("64M"))?;
    let creds = format!(
        "tls-creds-x509,id=tls0,endpoint=server,verify-peer=on,dir={}",
        s.path("server").display()
    );
    let server = qemu_nbd(
        &s.path("d.qcow2"),
        &s.path("nbd.sock"),
        "qcow2",
        &[
            "--shared=8",
            "--object",
            &creds,
            "--tls-creds=tls0",
            "--object",
            "authz-simple,id=authz0,identity=CN=sendense-agent.job-a",
            "--tls-authz=authz0",
        ],
    )?;
    let url = tls_url(&server.socket, "web-hub.ns.svc");

    // The named client: reads and writes, on every connection multi-conn opens.
    let c = NbdClient::connect(&url, &tls_opts(&s.path("agent"))?)
        .await
        .context("the agent's own certificate")?;
    assert!(c.connections() > 1, "multi-conn over TLS too");
    let data = pattern(7, 1 << 20);
    c.write(3 << 20, data.clone()).await?;
    c.flush().await?;
    assert_eq!(c.read(3 << 20, 1 << 20).await?, data);
    c.disconnect().await;

    // Without TLS: the server says it requires TLS, and we say so.
    let e = refused(&server.url(""), &opts()).await;
    assert!(e.contains("requires TLS"), "{e}");
    // An nbds URL without certificates is refused before connecting.
    let e = refused(&url, &opts()).await;
    assert!(e.contains("--tls-dir"), "{e}");
    // Another job's certificate from the same CA: the server's authz refuses it.
    let e = refused(&url, &tls_opts(&s.path("other-job"))?).await;
    assert!(e.contains("did not accept this client certificate"), "{e}");
    // A certificate of another CA, even with the right name.
    let e = refused(&url, &tls_opts(&s.path("foreign"))?).await;
    assert!(e.contains("TLS"), "{e}");
    // A server certificate for another name is not trusted.
    let e = refused(
        &tls_url(&server.socket, "db-hub.ns.svc"),
        &tls_opts(&s.path("agent"))?,
    )
    .await;
    assert!(
        e.contains("TLS handshake") && e.contains("db-hub.ns.svc"),
        "{e}"
    );

    // libnbd agrees: nbdinfo with the agent's directory reads the export, without it fails.
    let socket = server.socket.display().to_string();
    let with = run(Command::new("nbdinfo").arg("--size").arg(format!(
        "nbds+unix:///?socket={socket}&tls-certificates={}",
        s.path("agent").display()
    )))?;
    assert_eq!(with.trim(), (64u64 << 20).to_string());
    for uri in [
        format!("nbd+unix:///?socket={socket}"),
        format!(
            "nbds+unix:///?socket={socket}&tls-certificates={}",
            s.path("other-job").display()
        ),
    ] {
        let out = Command::new("nbdinfo").arg("--size").arg(&uri).output()?;
        assert!(!out.status.success(), "nbdinfo {uri} was served");
    }
    // The server is still serving the agent after all that.
    let c = NbdClient::connect(&url, &tls_opts(&s.path("agent"))?).await?;
    assert_eq!(c.read(3 << 20, 1 << 20).await?, data);
    c.disconnect().await;
    Ok(())
}

#[test]
fn a_tls_directory_missing_a_file_names_it() -> Result<()> {
    let s = Scratch::new("tls-dir");
    let ca = Ca::new("sendense test CA")?;
    ca.issue(&s.path("agent"), "client", "a")?;
    std::fs::remove_file(s.path("agent/client-key.pem"))?;
    let e = TlsClient::from_dir(&s.path("agent"))
        .expect_err("no key")
        .to_string();
    assert!(e.contains("client-key.pem"), "{e}");
    std::fs::write(s.path("agent/ca-cert.pem"), "not a certificate")?;
    let e = TlsClient::from_dir(&s.path("agent"))
        .expect_err("no CA")
        .to_string();
    assert!(e.contains("ca-cert.pem"), "{e}");
    Ok(())
}
