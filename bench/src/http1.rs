//! A minimal HTTP/1.1 client over one keep-alive TCP connection: just enough for the
//! burst and open-loop scenarios, which must open their connections before the clock starts
//! and see every status and transport error themselves.

use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The largest response body read; the scenarios' answers are a few hundred bytes.
const MAX_BODY: usize = 1 << 20;

/// One open connection to a server.
pub struct Conn {
    stream: BufReader<TcpStream>,
}

/// A response, read completely.
#[derive(Debug)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// Headers as (lower-case name, value).
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// The server said `Connection: close`: the connection cannot be reused.
    pub close: bool,
}

impl Reply {
    /// The value of header `name` (lower case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

impl Conn {
    /// Connects, with Nagle off so a small request is sent at once.
    ///
    /// # Errors
    /// The connection is refused or does not open within `limit`.
    pub async fn connect(addr: SocketAddr, limit: Duration) -> Result<Self> {
        let stream = tokio::time::timeout(limit, TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to {addr} timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        Ok(Self {
            stream: BufReader::new(stream),
        })
    }

    /// Sends `GET path` and reads the whole response, within `limit`.
    ///
    /// # Errors
    /// A transport error, a malformed response, or no complete response within `limit`.
    pub async fn get(&mut self, path: &str, limit: Duration) -> Result<Reply> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        tokio::time::timeout(limit, async {
            self.stream
                .get_mut()
                .write_all(request.as_bytes())
                .await
                .context("sending a request")?;
            self.read_reply().await
        })
        .await
        .with_context(|| format!("no response to GET {path} within {limit:?}"))?
    }

    async fn read_reply(&mut self) -> Result<Reply> {
        let status_line = self.read_line().await?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("malformed status line {status_line:?}"))?;
        let mut headers = Vec::new();
        loop {
            let line = self.read_line().await?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .with_context(|| format!("malformed header {line:?}"))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let mut reply = Reply {
            status,
            close: false,
            body: Vec::new(),
            headers,
        };
        reply.close = reply
            .header("connection")
            .is_some_and(|value| value.eq_ignore_ascii_case("close"));
        reply.body = self.read_body(&reply).await?;
        Ok(reply)
    }

    async fn read_body(&mut self, reply: &Reply) -> Result<Vec<u8>> {
        if reply
            .header("transfer-encoding")
            .is_some_and(|value| value.eq_ignore_ascii_case("chunked"))
        {
            return self.read_chunked().await;
        }
        let length: usize = match reply.header("content-length") {
            Some(value) => value.parse().context("malformed Content-Length")?,
            None => 0,
        };
        self.read_exact(length).await
    }

    async fn read_chunked(&mut self) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let size_line = self.read_line().await?;
            let hex = size_line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(hex, 16)
                .with_context(|| format!("malformed chunk size {size_line:?}"))?;
            if size == 0 {
                // Trailers, if any, end with an empty line.
                while !self.read_line().await?.is_empty() {}
                return Ok(body);
            }
            body.extend(self.read_exact(size).await?);
            self.read_line().await?;
        }
    }

    async fn read_exact(&mut self, length: usize) -> Result<Vec<u8>> {
        if length > MAX_BODY {
            bail!("response body of {length} bytes is larger than {MAX_BODY}");
        }
        let mut body = vec![0; length];
        self.stream
            .read_exact(&mut body)
            .await
            .context("reading a response body")?;
        Ok(body)
    }

    async fn read_line(&mut self) -> Result<String> {
        let mut line = String::new();
        let read = self
            .stream
            .read_line(&mut line)
            .await
            .context("reading a response")?;
        if read == 0 {
            bail!("the server closed the connection");
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }
}
