//! A minimal HTTP/1.1 client over one keep-alive TCP connection: one request at a time,
//! responses framed by `Content-Length` or chunked. Enough for the Cognito APIs, which
//! answer small JSON bodies; a load generator needs no more (and no TLS: it targets a
//! node's plain port).

use crate::conn::Fail;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head or body accepted.
const MAX_RESPONSE: usize = 16 << 20;

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// `x-amzn-ErrorType`, when the server sent one.
    pub error_type: Option<String>,
    pub body: Vec<u8>,
}

#[derive(Debug)]
pub struct Http {
    stream: TcpStream,
    /// `host:port`, sent as `Host` (and signed).
    pub host: String,
    buf: Vec<u8>,
}

impl Http {
    pub async fn connect(host: &str) -> Result<Http, Fail> {
        let stream = TcpStream::connect(host)
            .await
            .map_err(|e| Fail::new("connect_failed", e.to_string()))?;
        let _ = stream.set_nodelay(true);
        Ok(Http {
            stream,
            host: host.to_owned(),
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends one request and reads its response. `headers` are sent as given.
    pub async fn request(
        &mut self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response, Fail> {
        let mut head = format!(
            "{method} {path_and_query} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.host,
            body.len()
        );
        for (name, value) in headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body);
        self.stream.write_all(&out).await.map_err(lost)?;
        self.read_response().await
    }

    async fn fill(&mut self) -> Result<(), Fail> {
        if self.buf.len() > MAX_RESPONSE {
            return Err(Fail::new("bad_response", "response too large"));
        }
        self.buf.reserve(16384);
        let n = self.stream.read_buf(&mut self.buf).await.map_err(lost)?;
        if n == 0 {
            return Err(Fail::new("connection_lost", "closed by the server"));
        }
        Ok(())
    }

    async fn read_response(&mut self) -> Result<Response, Fail> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Fail::new("bad_response", "no status line"))?;
        let mut length = None;
        let mut chunked = false;
        let mut error_type = None;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("x-amzn-errortype") {
                // `Type:detail` forms keep only the type.
                error_type = Some(value.split(':').next().unwrap_or(value).to_owned());
            }
        }
        let body = if chunked {
            self.read_chunked().await?
        } else {
            let length = length.unwrap_or(0);
            if length > MAX_RESPONSE {
                return Err(Fail::new("bad_response", "response too large"));
            }
            while self.buf.len() < length {
                self.fill().await?;
            }
            self.buf.drain(..length).collect()
        };
        Ok(Response {
            status,
            error_type,
            body,
        })
    }

    async fn read_chunked(&mut self) -> Result<Vec<u8>, Fail> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                self.fill().await?;
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| Fail::new("bad_response", "bad chunk size"))?;
            self.buf.drain(..line_end + 2);
            if body.len() + size > MAX_RESPONSE {
                return Err(Fail::new("bad_response", "response too large"));
            }
            while self.buf.len() < size + 2 {
                self.fill().await?;
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
            if size == 0 {
                return Ok(body);
            }
        }
    }
}

fn lost(e: std::io::Error) -> Fail {
    Fail::new("connection_lost", e.to_string())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
