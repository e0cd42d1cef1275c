//! Talking to the servers: connections, request builders, buyer tokens, and one
//! request sent and timed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{SendRequest, handshake};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use uuid::Uuid;

/// One replica to send to.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    authority: String,
    addr: SocketAddr,
}

pub async fn targets(urls: &[String]) -> Result<Vec<Target>, String> {
    let mut targets = Vec::new();
    for url in urls {
        let uri: Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
        let authority = uri
            .authority()
            .ok_or_else(|| format!("URL without host: {url}"))?
            .to_string();
        let with_port = if uri.port().is_some() {
            authority.clone()
        } else {
            format!("{authority}:80")
        };
        let addr = tokio::net::lookup_host(&with_port)
            .await
            .map_err(|e| format!("cannot resolve {url}: {e}"))?
            .next()
            .ok_or_else(|| format!("cannot resolve {url}"))?;
        targets.push(Target {
            url: url.trim_end_matches('/').to_owned(),
            authority,
            addr,
        });
    }
    Ok(targets)
}

/// An HTTP answer, read whole.
pub struct Answer {
    pub status: u16,
    pub replayed: bool,
    pub body: Bytes,
}

pub type Sender = SendRequest<Full<Bytes>>;

pub async fn connect(target: &Target) -> Result<Sender, String> {
    let stream = TcpStream::connect(target.addr)
        .await
        .map_err(|e| format!("connect {}: {e}", target.url))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, connection) = handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake {}: {e}", target.url))?;
    tokio::spawn(connection);
    Ok(sender)
}

pub fn purchase_request(
    target: &Target,
    event: Uuid,
    key: &str,
    quantity: u8,
    token: Option<&str>,
) -> Request<Full<Bytes>> {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(format!("/api/v1/events/{event}/purchase"))
        .header("host", &target.authority)
        .header("content-type", "application/json")
        .header("idempotency-key", key);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    request
        .body(Full::new(Bytes::from(format!(
            "{{\"quantity\":{quantity}}}"
        ))))
        .expect("valid request")
}

/// HS256 tokens for buyers `rush-<run>-0` … `rush-<run>-<count − 1>`, valid for
/// `valid_for`, signed with the servers' buyer key.
pub fn sign_buyer_tokens(
    key: &str,
    run: &str,
    count: usize,
    valid_for: Duration,
) -> Result<Vec<String>, String> {
    let exp = jsonwebtoken::get_current_timestamp() + valid_for.as_secs();
    let key = jsonwebtoken::EncodingKey::from_secret(key.as_bytes()).map_err(|e| e.to_string())?;
    (0..count)
        .map(|i| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &serde_json::json!({"sub": format!("rush-{run}-{i}"), "exp": exp}),
                &key,
            )
            .map_err(|e| format!("signing a buyer token: {e}"))
        })
        .collect()
}

/// A request of the lifecycle and queue modes: `body`, if any, sent as JSON.
pub fn request(
    target: &Target,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&serde_json::Value>,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", &target.authority);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let body = match body {
        Some(body) => {
            builder = builder.header("content-type", "application/json");
            Bytes::from(body.to_string())
        }
        None => Bytes::new(),
    };
    builder.body(Full::new(body)).expect("valid request")
}

pub fn token(tokens: &[String], n: u64) -> Option<&str> {
    (!tokens.is_empty()).then(|| tokens[n as usize % tokens.len()].as_str())
}

/// A copy of a request whose body is in memory, for sending it again.
pub fn clone_request(request: &Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    let mut copy = Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    copy
}

pub fn get_request(target: &Target, path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(path)
        .header("host", &target.authority)
        .body(Full::new(Bytes::new()))
        .expect("valid request")
}

pub async fn send(
    sender: &mut Sender,
    request: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Answer, String> {
    let exchange = async {
        sender.ready().await.map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let replayed = response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Answer {
            status,
            replayed,
            body,
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// A short random id, so the keys of one run never collide with another's.
pub fn run_id() -> String {
    Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// Kept-alive connections shared by many tasks, spread over the replicas, with a
/// bound on requests in flight.
pub struct Pool {
    targets: Vec<Target>,
    idle: std::sync::Mutex<Vec<(usize, Sender)>>,
    permits: Semaphore,
    next: AtomicU64,
    timeout: Duration,
    requests: AtomicU64,
}

impl Pool {
    pub fn new(targets: Vec<Target>, in_flight: usize, timeout: Duration) -> Self {
        Self {
            targets,
            idle: std::sync::Mutex::new(Vec::new()),
            permits: Semaphore::new(in_flight.max(1)),
            next: AtomicU64::new(0),
            timeout,
            requests: AtomicU64::new(0),
        }
    }

    /// Requests sent so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Sends one request (`body` as JSON); its status and JSON body (`null` if none).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<(u16, Value), String> {
        let _permit = self.permits.acquire().await.map_err(|e| e.to_string())?;
        // A pooled connection the server closed while idle is dropped, and the
        // request is sent once more on a fresh one.
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if let Some((t, mut sender)) = pooled.filter(|(_, s)| !s.is_closed())
            && let Ok(answer) = self
                .send_on(t, &mut sender, &method, path, headers, &body)
                .await
        {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((t, sender));
            return Ok(answer);
        }
        let t = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.targets.len();
        let mut sender = connect(&self.targets[t]).await?;
        let answer = self
            .send_on(t, &mut sender, &method, path, headers, &body)
            .await?;
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((t, sender));
        Ok(answer)
    }

    async fn send_on(
        &self,
        t: usize,
        sender: &mut Sender,
        method: &Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &Option<Value>,
    ) -> Result<(u16, Value), String> {
        let request = request(
            &self.targets[t],
            method.clone(),
            path,
            headers,
            body.as_ref(),
        );
        self.requests.fetch_add(1, Ordering::Relaxed);
        let answer: Answer = send(sender, request, self.timeout).await?;
        Ok((
            answer.status,
            serde_json::from_slice(&answer.body).unwrap_or_default(),
        ))
    }
}
