//! Container probes (TCP, HTTP GET, exec), each attempt bounded by the probe's timeoutSeconds.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::process::{self, ProcessSpec};

/// The probe's timing, with the API's defaults.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Timing {
    pub fn of(p: &Probe) -> Self {
        let secs =
            |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
        Self {
            initial_delay: secs(p.initial_delay_seconds, 0),
            period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
        }
    }
}

/// Why a probe spec cannot be honoured (checked before the pod starts).
pub fn unsupported(p: &Probe) -> Option<String> {
    if p.grpc.is_some() {
        return Some("gRPC probes are not supported".into());
    }
    if p.tcp_socket.is_none() && p.http_get.is_none() && p.exec.is_none() {
        return Some("a probe needs tcpSocket, httpGet or exec".into());
    }
    None
}

fn port_of(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("port {n} out of range")),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("no container port named {name}")),
    }
}

/// Runs one probe attempt; Ok(()) is success, Err carries the failure as a person reads it.
pub async fn attempt(
    p: &Probe,
    container: &Container,
    pod_ip: &str,
    exec_base: &ProcessSpec,
) -> Result<(), String> {
    let timeout = Timing::of(p).timeout;
    let run = async {
        if let Some(tcp) = &p.tcp_socket {
            let port = port_of(&tcp.port, container)?;
            let host = tcp.host.clone().unwrap_or_else(|| pod_ip.to_owned());
            TcpStream::connect((host.as_str(), port))
                .await
                .map(|_| ())
                .map_err(|e| format!("dial tcp {host}:{port}: {e}"))
        } else if let Some(http) = &p.http_get {
            let port = http.port.clone();
            let port = port_of(&port, container)?;
            let host = http.host.clone().unwrap_or_else(|| pod_ip.to_owned());
            if http
                .scheme
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case("https"))
            {
                return Err("HTTPS probes are not supported".into());
            }
            http_get(&host, port, http.path.as_deref().unwrap_or("/")).await
        } else if let Some(exec) = &p.exec {
            let argv = exec.command.clone().unwrap_or_default();
            let Some((program, args)) = argv.split_first() else {
                return Err("exec probe without a command".into());
            };
            let search: Vec<_> = exec_base
                .env
                .iter()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| std::env::split_paths(v).collect())
                .unwrap_or_default();
            let program = process::resolve_program(program, &search)
                .ok_or_else(|| format!("exec probe: {program}: not found"))?;
            let spec = ProcessSpec {
                program,
                args: args.to_vec(),
                log: None,
                ..exec_base.clone()
            };
            let mut child = process::spawn(&spec).map_err(|e| format!("exec probe: {e}"))?;
            let status = child.wait().await.map_err(|e| format!("exec probe: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("exec probe exited with {status}"))
            }
        } else {
            Err("probe has no handler".into())
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(format!("probe timed out after {timeout:?}")),
    }
}

async fn http_get(host: &str, port: u16, path: &str) -> Result<(), String> {
    let mut stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("dial tcp {host}:{port}: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.34\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = vec![0u8; 64];
    let n = stream.read(&mut head).await.map_err(|e| e.to_string())?;
    let line = String::from_utf8_lossy(&head[..n]);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("malformed HTTP response: {line:?}"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {code}"))
    }
}
