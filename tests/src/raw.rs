//! A bare WebSocket client over TCP, for what `Connection` cannot do: send invalid frames,
//! or stop reading so that the server's socket fills up.

use crate::TestServer;
use std::time::Duration;
use tandem_protocol::{ClientFrame, ServerFrame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(20);

/// A bare WebSocket client over TCP, for frames `Connection` cannot send (invalid UTF-8).
pub struct RawSocket {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes `sip` read so far.
    pub sipped: usize,
}

impl RawSocket {
    pub async fn connect(server: &TestServer) -> RawSocket {
        Self::connect_with_buffer(server, None).await
    }

    /// Connects with a receive buffer of `rcvbuf` bytes (the kernel's default otherwise).
    pub async fn connect_with_buffer(server: &TestServer, rcvbuf: Option<u32>) -> RawSocket {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(bytes) = rcvbuf {
            socket.set_recv_buffer_size(bytes).unwrap();
        }
        let mut stream = socket.connect(server.addr).await.unwrap();
        let request = format!(
            "GET /v1/sync HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            server.addr
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut socket = RawSocket {
            stream,
            buf: Vec::new(),
            sipped: 0,
        };
        let end = loop {
            if let Some(end) = socket.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            assert!(socket.fill().await, "no handshake response");
        };
        let head = String::from_utf8_lossy(&socket.buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        socket.buf.drain(..end);
        socket
    }

    pub async fn fill(&mut self) -> bool {
        self.read_up_to(4096).await.is_some()
    }

    /// Reads at most `bytes` into the buffer; `None` once the socket ended.
    async fn read_up_to(&mut self, bytes: usize) -> Option<usize> {
        let mut chunk = vec![0u8; bytes];
        match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => None,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Some(n)
            }
            Err(_) => panic!("nothing from the server in time"),
        }
    }

    /// Sends one final, masked frame.
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) {
        self.send_frame(true, opcode, payload).await;
    }

    /// Sends one masked frame; `fin: false` starts or continues a fragmented message.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n @ 0..=125 => frame.push(0x80 | n as u8),
            n @ 126..=0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.unwrap();
    }

    /// The next frame's (opcode, payload), or `None` once the socket ended.
    pub async fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some(frame) = self.take_frame() {
                return Some(frame);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next complete frame already in the buffer, as (opcode, payload).
    fn take_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        if self.buf.len() < 2 {
            return None;
        }
        let opcode = self.buf[0] & 0x0f;
        let (len, at) = match self.buf[1] & 0x7f {
            126 if self.buf.len() >= 4 => (
                usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                4,
            ),
            127 if self.buf.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&self.buf[2..10]);
                (usize::try_from(u64::from_be_bytes(n)).unwrap(), 10)
            }
            126 | 127 => return None,
            n => (usize::from(n), 2),
        };
        if self.buf.len() < at + len {
            return None;
        }
        let payload = self.buf[at..at + len].to_vec();
        self.buf.drain(..at + len);
        Some((opcode, payload))
    }

    /// Connects and authenticates as `sub` with an `auth` frame.
    pub async fn authenticated(server: &TestServer, sub: &str) -> RawSocket {
        Self::with_features(server, sub, &[]).await.0
    }

    /// Connects and authenticates as `sub`, asking for protocol features; returns the
    /// features `ready` named.
    pub async fn with_features(
        server: &TestServer,
        sub: &str,
        features: &[&str],
    ) -> (RawSocket, Vec<String>) {
        Self::with_features_and_buffer(server, sub, features, None).await
    }

    /// `with_features`, with a receive buffer of `rcvbuf` bytes.
    pub async fn with_features_and_buffer(
        server: &TestServer,
        sub: &str,
        features: &[&str],
        rcvbuf: Option<u32>,
    ) -> (RawSocket, Vec<String>) {
        let mut raw = RawSocket::connect_with_buffer(server, rcvbuf).await;
        let auth = ClientFrame::Auth {
            id: None,
            token: server.token(sub),
            features: features.iter().map(|f| f.to_string()).collect(),
        };
        raw.send(0x1, auth.to_json().as_bytes()).await;
        match raw.recv_frame().await {
            ServerFrame::Ready { features, .. } => (raw, features),
            other => panic!("{other:?}"),
        }
    }

    /// The next frame, which must be a text frame: its text.
    pub async fn recv_text(&mut self) -> String {
        let (opcode, payload) = self.recv().await.expect("a frame");
        let text = String::from_utf8(payload).unwrap();
        assert_eq!(opcode, 0x1, "{text}");
        text
    }

    /// The next frame, which must be a text frame holding a server frame (either record
    /// encoding).
    pub async fn recv_frame(&mut self) -> ServerFrame {
        ServerFrame::from_json(&self.recv_text().await).unwrap()
    }

    /// Reads at most `bytes` more from the socket into the buffer, a slow reader's sip.
    pub async fn sip(&mut self, bytes: usize) -> bool {
        match self.read_up_to(bytes).await {
            Some(n) => {
                self.sipped += n;
                true
            }
            None => false,
        }
    }

    /// A complete frame already read, without reading more.
    pub fn buffered_frame(&mut self) -> Option<ServerFrame> {
        let (_, payload) = self.take_frame()?;
        ServerFrame::from_json(std::str::from_utf8(&payload).ok()?).ok()
    }

    /// Reads until a close frame; returns its code, or `None` if the socket ended without one.
    pub async fn close_code(&mut self) -> Option<u16> {
        while let Some((opcode, payload)) = self.recv().await {
            if opcode == 0x8 {
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
        None
    }
}
