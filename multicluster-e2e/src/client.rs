//! A keep-alive HTTP/1.1 client that talks to a sidecar's outbound port
//! as `curl -x` does (absolute-form requests): the one test client of the
//! lab, the sidecar's tests and the demo.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// An answer, or why there was none.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Answer {
    /// A header's value ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// `cluster` of a sample app's answer (`… from <cluster> …`).
    pub fn cluster(&self) -> Option<&str> {
        let mut it = self.body.split_whitespace();
        it.find(|w| *w == "from")?;
        it.next()
    }
    /// The answering cluster, or `FAILED <status> <body>`.
    pub fn label(&self) -> String {
        if self.ok() {
            self.cluster().unwrap_or("?").to_owned()
        } else {
            format!("FAILED {} {}", self.status, self.body.trim())
        }
    }

    pub fn ok(&self) -> bool {
        self.status == 200
    }
}

#[derive(Debug)]
pub struct Client {
    proxy: SocketAddr,
    conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Client {
    pub fn new(proxy: SocketAddr) -> Self {
        Self { proxy, conn: None }
    }

    /// GETs `url` through the sidecar. A transport failure is an answer
    /// with status 0 and the error as body (tests count it as failed).
    pub async fn get(&mut self, url: &str) -> Answer {
        self.get_with(url, &[]).await
    }

    /// [`Client::get`] with extra headers.
    pub async fn get_with(&mut self, url: &str, headers: &[(&str, &str)]) -> Answer {
        self.request("GET", url, headers).await
    }

    /// Any method, with extra headers (empty body).
    pub async fn request(&mut self, method: &str, url: &str, headers: &[(&str, &str)]) -> Answer {
        let failed = |body: String| Answer {
            status: 0,
            headers: Default::default(),
            body,
        };
        match tokio::time::timeout(
            Duration::from_secs(10),
            self.try_request(method, url, headers),
        )
        .await
        {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                self.conn = None;
                failed(e)
            }
            Err(_) => {
                self.conn = None;
                failed("timed out after 10 s".into())
            }
        }
    }

    async fn try_request(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<Answer, String> {
        let mut b = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
        let sender = match &mut self.conn {
            Some(s) if !s.is_closed() => s,
            _ => {
                let tcp = TcpStream::connect(self.proxy)
                    .await
                    .map_err(|e| format!("connect {}: {e}", self.proxy))?;
                let _ = tcp.set_nodelay(true);
                let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(c);
                self.conn.insert(s)
            }
        };
        sender.ready().await.map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Answer {
            status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}
