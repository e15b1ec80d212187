//! An async NBD client: fixed-newstyle negotiation with NBD_OPT_GO, structured replies,
//! `base:allocation` block status, many requests in flight per connection matched by handle,
//! several connections when the server advertises multi-conn, and a deadline on connect and on
//! every request. A server that stops answering fails the request and closes the connection;
//! nothing waits forever.

mod client;
mod conn;
mod handshake;
mod inflight;
mod pool;
pub mod proto;
mod reader;
mod tls;
mod writer;

use std::time::Duration;

pub use client::NbdClient;
pub use proto::{BlockSize, Extent};
pub use tls::{CA_CERT, CLIENT_CERT, CLIENT_KEY, TlsClient, TlsError};

/// What went wrong talking NBD.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("invalid NBD URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("NBD negotiation with {addr} failed: {reason}")]
    Negotiation { addr: String, reason: String },
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    #[error("server error on {command}: {errno} {name}{message}")]
    Server {
        command: &'static str,
        errno: u32,
        name: &'static str,
        message: String,
    },
    #[error("request out of range: {0}")]
    Range(String),
    #[error("the export does not support {0}")]
    Unsupported(&'static str),
    #[error("connection closed: {0}")]
    Closed(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Where an export is: `nbd://host:port/name` or `nbd+unix:///name?socket=/path`; `nbds://`
/// and `nbds+unix://` for TLS, optionally with `?tls-hostname=NAME`, the name the server's
/// certificate must carry when it is not the host connected to (as in libnbd's URIs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUrl {
    pub address: Address,
    pub export: String,
    /// `Some` for TLS: the server name to verify (`tls-hostname`, else the host).
    pub tls: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for NbdUrl {
    type Err = NbdError;
    fn from_str(s: &str) -> Result<Self, NbdError> {
        let bad = |reason: &str| NbdError::Url {
            url: s.to_owned(),
            reason: reason.to_owned(),
        };
        let u = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        let export = u.path().strip_prefix('/').unwrap_or(u.path());
        let export = percent_decode(export);
        let param = |name: &str| {
            u.query_pairs()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        let tls = matches!(u.scheme(), "nbds" | "nbds+unix");
        let (address, default_name) = match u.scheme() {
            "nbd" | "nbds" => {
                let host = u
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| bad("missing host"))?;
                let host = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned();
                let port = u.port().unwrap_or(10809);
                (
                    Address::Tcp {
                        host: host.clone(),
                        port,
                    },
                    Some(host),
                )
            }
            "nbd+unix" | "nbds+unix" => {
                let socket = param("socket").ok_or_else(|| bad("nbd+unix needs ?socket=/path"))?;
                (Address::Unix(socket.into()), None)
            }
            other => {
                return Err(bad(&format!(
                    "scheme {other} is not nbd, nbds, nbd+unix or nbds+unix"
                )));
            }
        };
        let tls = match (tls, param("tls-hostname").or(default_name)) {
            (false, _) => None,
            (true, Some(name)) => Some(name),
            (true, None) => return Err(bad("nbds+unix needs ?tls-hostname=NAME")),
        };
        Ok(NbdUrl {
            address,
            export,
            tls,
        })
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// How to connect and how long to wait.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// TCP connect plus negotiation, per connection.
    pub connect_timeout: Duration,
    /// Each request, from sending to its last reply chunk.
    pub request_timeout: Duration,
    /// Requests in flight per connection.
    pub max_in_flight: usize,
    /// Connections to open when the server advertises multi-conn (otherwise one).
    pub connections: usize,
    /// Ask for `base:allocation` block status.
    pub block_status: bool,
    /// Certificates for `nbds://` URLs (a plain `nbd://` URL never uses TLS).
    pub tls: Option<TlsClient>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(120),
            max_in_flight: 64,
            connections: 4,
            block_status: true,
            tls: None,
        }
    }
}

impl ConnectOptions {
    /// The defaults, with `request_timeout` for each request.
    pub fn with_request_timeout(request_timeout: Duration) -> Self {
        Self {
            request_timeout,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix_urls() {
        let u: NbdUrl = "nbd://127.0.0.1:10100/disk-2000".parse().expect("valid");
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 10100
            }
        );
        assert_eq!(u.export, "disk-2000");
        let u: NbdUrl = "nbd://hub.example".parse().expect("valid");
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "hub.example".into(),
                port: 10809
            }
        );
        assert_eq!(u.export, "");
        let u: NbdUrl = "nbd+unix:///x?socket=/run/nbd.sock".parse().expect("valid");
        assert_eq!(u.address, Address::Unix("/run/nbd.sock".into()));
        assert_eq!(u.export, "x");
        let u: NbdUrl = "nbd://[::1]:10100/a%20b".parse().expect("valid");
        assert_eq!(u.address.to_string(), "[::1]:10100");
        assert_eq!(u.export, "a b");
        assert_eq!(u.tls, None);
        let u: NbdUrl = "nbds://10.0.0.5:10100/?tls-hostname=web-hub.ns.svc"
            .parse()
            .expect("valid");
        assert_eq!(u.address.to_string(), "10.0.0.5:10100");
        assert_eq!(u.tls.as_deref(), Some("web-hub.ns.svc"));
        let u: NbdUrl = "nbds://hub.example:1/".parse().expect("valid");
        assert_eq!(u.tls.as_deref(), Some("hub.example"));
    }

    #[test]
    fn rejects_bad_urls_with_the_reason() {
        for (url, why) in [
            ("http://x/y", "scheme"),
            ("nbd+unix:///x", "socket"),
            ("nbds+unix:///y?socket=/s", "tls-hostname"),
            ("nbd:///y", "host"),
        ] {
            let e = url.parse::<NbdUrl>().expect_err(url).to_string();
            assert!(e.contains(why), "{url}: {e}");
        }
    }
}
