//! WebSocket close codes. Like centrifuge, the range says what a client should do:
//! 4000-4499 means "reconnect (with backoff)", 4500-4999 means "do not reconnect as you are";
//! fix the token or the client first.

/// A close code the gateway sends, with the reason text it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// The server is shutting down or restarting; reconnect, possibly to another node.
    GoingAway,
    /// The connection could not keep up with its pushes past the write deadline; reconnect.
    Slow,
    /// The token expired during the session; reconnect with a fresh token.
    TokenExpired,
    /// The server hit an internal fault on this connection; reconnect with backoff.
    Internal,
    /// No `auth` frame (and no `Authorization` header) arrived in time; reconnect and
    /// authenticate promptly.
    AuthTimeout,
    /// The identity already holds `max_connections_per_identity` sessions on this node;
    /// reconnect later, with backoff, or close another connection first.
    TooManyConnections,
    /// The session reached `max_session_age`; reconnect (a fresh token may be needed).
    SessionAge,
    /// The session had no subscriptions and sent no request for `idle_timeout`; reconnect
    /// when there is something to sync.
    Idle,
    /// The token was refused (bad signature, wrong algorithm, expired at connect, wrong
    /// issuer or audience); do not reconnect with the same token.
    Unauthorized,
    /// A frame was larger than the server's maximum frame size; do not resend it.
    MessageTooBig,
    /// The peer broke the WebSocket protocol (a malformed frame, a text frame that is not
    /// UTF-8); do not reconnect without fixing the client. Binary frames are refused with a
    /// `bad_request` error instead and the connection stays open.
    ProtocolError,
    /// More `bad_request` answers in a short time than the server's `max_bad_frames`
    /// allows: the client keeps sending what it cannot send; do not reconnect without fixing
    /// the client.
    TooManyBadFrames,
}

impl CloseCode {
    pub const ALL: [CloseCode; 12] = [
        CloseCode::GoingAway,
        CloseCode::Slow,
        CloseCode::TokenExpired,
        CloseCode::Internal,
        CloseCode::AuthTimeout,
        CloseCode::TooManyConnections,
        CloseCode::SessionAge,
        CloseCode::Idle,
        CloseCode::Unauthorized,
        CloseCode::MessageTooBig,
        CloseCode::ProtocolError,
        CloseCode::TooManyBadFrames,
    ];

    /// The numeric code on the wire.
    pub const fn code(self) -> u16 {
        match self {
            CloseCode::GoingAway => 4000,
            CloseCode::Slow => 4001,
            CloseCode::TokenExpired => 4002,
            CloseCode::Internal => 4003,
            CloseCode::AuthTimeout => 4004,
            CloseCode::TooManyConnections => 4005,
            CloseCode::SessionAge => 4006,
            CloseCode::Idle => 4007,
            CloseCode::Unauthorized => 4500,
            CloseCode::MessageTooBig => 4501,
            CloseCode::ProtocolError => 4502,
            CloseCode::TooManyBadFrames => 4503,
        }
    }

    /// The close reason text (short: a close frame's reason is at most 123 bytes).
    pub const fn reason(self) -> &'static str {
        match self {
            CloseCode::GoingAway => "going away, reconnect",
            CloseCode::Slow => "slow, reconnect",
            CloseCode::TokenExpired => "token expired, reconnect with a fresh token",
            CloseCode::Internal => "internal error, reconnect",
            CloseCode::AuthTimeout => "no auth in time, reconnect",
            CloseCode::TooManyConnections => "too many connections, reconnect later",
            CloseCode::SessionAge => "session too old, reconnect",
            CloseCode::Idle => "idle, reconnect when needed",
            CloseCode::Unauthorized => "unauthorized, do not reconnect with this token",
            CloseCode::MessageTooBig => "frame too large, do not resend",
            CloseCode::ProtocolError => "protocol error, do not reconnect",
            CloseCode::TooManyBadFrames => "too many bad frames, do not reconnect",
        }
    }

    /// Whether a client should reconnect after this close.
    pub const fn reconnect(self) -> bool {
        self.code() < 4500
    }

    pub fn from_code(code: u16) -> Option<CloseCode> {
        CloseCode::ALL.into_iter().find(|c| c.code() == code)
    }
}

/// Whether a client should reconnect after a close with this code, including codes this
/// crate does not name (standard codes: 1000 and 1008 no, everything else yes).
pub fn should_reconnect(code: u16) -> bool {
    match code {
        4000..=4499 => true,
        4500..=4999 => false,
        1000 | 1002 | 1003 | 1007 | 1008 | 1009 => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_close_code_ranges_tell_reconnect() {
        for c in CloseCode::ALL {
            assert_eq!(c.reconnect(), should_reconnect(c.code()), "{c:?}");
            assert_eq!(CloseCode::from_code(c.code()), Some(c));
            assert!(c.reason().len() <= 123);
        }
        assert!(CloseCode::GoingAway.reconnect());
        assert!(!CloseCode::Unauthorized.reconnect());
    }
}
