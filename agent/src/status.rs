//! The backup's status endpoint (`backup --status-addr`): a tiny HTTP/1.1 server answering
//! `GET /progress` with the live progress as JSON. One request per connection: the head is read
//! (at most `HEAD_LIMIT` bytes within `HEAD_TIMEOUT`), answered, and the connection closed.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::backup::LiveProgress;

/// Largest request head read.
pub const HEAD_LIMIT: usize = 8 << 10;
/// Time a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;

/// What a request head asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /progress`
    Progress,
    /// A GET of any other path.
    NotFound,
    /// Any method but GET.
    MethodNotAllowed,
    /// Not an HTTP/1.x request line.
    BadRequest,
    /// The head did not end within `HEAD_LIMIT` bytes.
    TooLarge,
    /// The head did not arrive within `HEAD_TIMEOUT`.
    Timeout,
}

/// The length of the request head in `buf` (through its blank line), once it is complete.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Routes a request by its request line (`METHOD SP TARGET SP HTTP/1.x`).
pub fn route(head: &[u8]) -> Route {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Route::BadRequest;
    };
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if !token(method) || target.is_empty() || !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    if method != "GET" {
        return Route::MethodNotAllowed;
    }
    // Origin form, or absolute form (`http://host/progress`).
    let path = match target.find("://") {
        Some(i) => {
            let rest = &target[i + 3..];
            rest.find('/').map_or("/", |p| &rest[p..])
        }
        None => target,
    };
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if path == "/progress" {
        Route::Progress
    } else {
        Route::NotFound
    }
}

/// The whole response to `route` (status line, headers, body), closing the connection.
pub fn response(route: Route, live: &LiveProgress) -> Vec<u8> {
    let (status, extra, content_type, body) = match route {
        Route::Progress => (
            "200 OK",
            "",
            "application/json",
            serde_json::to_string(&live.report()).unwrap_or_else(|_| "{}".into()),
        ),
        Route::NotFound => (
            "404 Not Found",
            "",
            "text/plain; charset=utf-8",
            "not found; try GET /progress\n".to_string(),
        ),
        Route::MethodNotAllowed => (
            "405 Method Not Allowed",
            "Allow: GET\r\n",
            "text/plain; charset=utf-8",
            "method not allowed\n".to_string(),
        ),
        Route::BadRequest => (
            "400 Bad Request",
            "",
            "text/plain; charset=utf-8",
            "bad request\n".to_string(),
        ),
        Route::TooLarge => (
            "431 Request Header Fields Too Large",
            "",
            "text/plain; charset=utf-8",
            "request head too large\n".to_string(),
        ),
        Route::Timeout => (
            "408 Request Timeout",
            "",
            "text/plain; charset=utf-8",
            "request timeout\n".to_string(),
        ),
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Binds the status listener. `:PORT` means every IPv4 address.
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let addr = if addr.starts_with(':') {
        format!("0.0.0.0{addr}")
    } else {
        addr.to_string()
    };
    TcpListener::bind(addr).await
}

/// Serves requests until dropped; dropping it closes the listener and every open connection.
pub async fn serve(listener: TcpListener, live: Arc<LiveProgress>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept(), if connections.len() < MAX_CONNECTIONS => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(handle(stream, live.clone()));
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!("status endpoint: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle(mut stream: TcpStream, live: Arc<LiveProgress>) {
    let route = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(route)) => route,
        Ok(Err(_)) => return,
        Err(_) => Route::Timeout,
    };
    let answer = response(route, &live);
    let write = async {
        stream.write_all(&answer).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(HEAD_TIMEOUT, write).await;
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Route> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf) {
            return Ok(route(&buf[..end]));
        }
        if buf.len() >= HEAD_LIMIT {
            return Ok(Route::TooLarge);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_method_and_path() {
        let r = |s: &str| route(s.as_bytes());
        assert_eq!(
            r("GET /progress HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Progress
        );
        assert_eq!(r("GET /progress?x=1 HTTP/1.0\r\n\r\n"), Route::Progress);
        assert_eq!(
            r("GET http://10.0.0.1:8080/progress HTTP/1.1\r\n\r\n"),
            Route::Progress
        );
        assert_eq!(r("GET /progress HTTP/1.1\n\n"), Route::Progress);
        assert_eq!(r("GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("GET /progress/x HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("GET /metrics HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            r("POST /progress HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(
            r("HEAD /progress HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(r("DELETE /x HTTP/1.1\r\n\r\n"), Route::MethodNotAllowed);
        assert_eq!(r("GET /progress\r\n\r\n"), Route::BadRequest);
        assert_eq!(r("GET  /progress HTTP/1.1\r\n\r\n"), Route::BadRequest);
        assert_eq!(r("GET /progress HTTP/2\r\n\r\n"), Route::BadRequest);
        assert_eq!(r("G(T /progress HTTP/1.1\r\n\r\n"), Route::BadRequest);
        assert_eq!(r("\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET /\xff HTTP/1.1\r\n\r\n"), Route::BadRequest);
    }

    #[test]
    fn finds_the_end_of_the_head() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b""), None);
    }

    #[test]
    fn progress_answers_json_with_the_stage_and_disk_counters() {
        use sendense_contract::progress::Stage;
        use std::sync::atomic::Ordering;
        let live = LiveProgress::default();
        let p = live.add_disk(2000);
        p.total.store(1000, Ordering::Relaxed);
        p.done.store(250, Ordering::Relaxed);
        live.set_stage(Stage::Copying);
        let answer = String::from_utf8(response(Route::Progress, &live)).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("Content-Type: application/json"), "{head}");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"stage": "copying", "bytesToCopy": 1000, "bytesCopied": 250,
                "disks": [{"key": 2000, "bytesToCopy": 1000, "bytesCopied": 250, "bytesVerified": 0}]})
        );
        let answer = String::from_utf8(response(Route::MethodNotAllowed, &live)).unwrap();
        assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
        assert!(answer.contains("Allow: GET\r\n"), "{answer}");
        let answer = String::from_utf8(response(Route::NotFound, &live)).unwrap();
        assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");
    }

    #[tokio::test]
    async fn serves_over_tcp_and_rejects_oversized_heads() {
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let live = Arc::new(LiveProgress::default());
        let server = tokio::spawn(serve(listener, live));
        let ask = |req: Vec<u8>| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            // The server may answer (and close) before the whole request is sent.
            let _ = s.write_all(&req).await;
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        };
        let a = ask(b"GET /progress HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(a.starts_with("HTTP/1.1 200 OK"), "{a}");
        assert!(
            a.ends_with(r#""stage":"connecting","bytesToCopy":0,"bytesCopied":0,"disks":[]}"#),
            "{a}"
        );
        let a = ask(b"PUT /progress HTTP/1.1\r\n\r\n".to_vec()).await;
        assert!(a.starts_with("HTTP/1.1 405"), "{a}");
        let mut big = b"GET /progress HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 10_000));
        let a = ask(big).await;
        assert!(a.starts_with("HTTP/1.1 431"), "{a}");
        server.abort();
        let _ = server.await;
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the listener is closed once the server is dropped"
        );
    }
}
