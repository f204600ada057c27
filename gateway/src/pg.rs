//! PostgreSQL wire protocol (v3) pieces the gateway needs: the startup phase, the
//! backend messages the proxy sends itself, and message framing for the relay.
//!
//! Everything here is a pure codec over byte slices so that both wings (the io_uring node
//! and the tokio proxy) can share it, and so that bad input is a value, never a panic.
//! Reference: <https://www.postgresql.org/docs/15/protocol-message-formats.html>.

use std::fmt;

/// PostgreSQL refuses startup packets longer than this (`MAX_STARTUP_PACKET_LENGTH` in
/// `src/include/libpq/pqcomm.h`); we use the same limit so clients see the same behaviour.
pub const MAX_STARTUP_PACKET_LENGTH: usize = 10_000;
/// Request codes that share the startup packet's shape (`pqcomm.h`).
pub const CANCEL_REQUEST_CODE: u32 = (1234 << 16) | 5678;
pub const SSL_REQUEST_CODE: u32 = (1234 << 16) | 5679;
pub const GSSENC_REQUEST_CODE: u32 = (1234 << 16) | 5680;
/// The only protocol major version PostgreSQL 15 (and every server since 7.4) speaks.
pub const PROTOCOL_MAJOR: u16 = 3;
/// Newest 3.x minor version the gateway implements; newer minors get a
/// `NegotiateProtocolVersion`, exactly like a PostgreSQL 15 server would send.
pub const PROTOCOL_MINOR: u16 = 0;
/// Upper bound for one backend message during the login phase; real ones are tiny, and a
/// hostile or broken server must not make the proxy allocate without bound.
pub const MAX_LOGIN_MESSAGE_LENGTH: usize = 1 << 20;

/// SQLSTATE codes the gateway itself raises (PostgreSQL's `errcodes.txt`).
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const INSUFFICIENT_RESOURCES: &str = "53000";
    pub const UNABLE_TO_ESTABLISH_CONNECTION: &str = "08001";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const CONNECTION_EXCEPTION: &str = "08000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
}

/// A startup-phase packet failed to parse; `message` is what the client will read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub sqlstate: &'static str,
    pub message: String,
}

impl ProtocolError {
    fn violation(message: impl Into<String>) -> Self {
        Self {
            sqlstate: sqlstate::PROTOCOL_VIOLATION,
            message: message.into(),
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.sqlstate)
    }
}

impl std::error::Error for ProtocolError {}

/// The first packet a client sends, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupRequest {
    Ssl,
    GssEnc,
    Cancel { pid: i32, secret: i32 },
    Startup(StartupMessage),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    /// Parameters in the order the client sent them (`user`, `database`, `options`, …).
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Protocol options (`_pq_.*`) a 3.0 server does not know; reported back to the client
    /// in `NegotiateProtocolVersion`, as PostgreSQL does.
    pub fn protocol_options(&self) -> Vec<String> {
        self.params
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Whether the client must be told which protocol we actually speak.
    pub fn needs_negotiation(&self) -> bool {
        self.minor > PROTOCOL_MINOR || !self.protocol_options().is_empty()
    }
}

/// Validates the 4-byte length prefix of a startup-phase packet and returns the whole
/// packet length (prefix included), with PostgreSQL's wording on failure.
pub fn startup_packet_len(header: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_be_bytes(header) as usize;
    if !(8..=MAX_STARTUP_PACKET_LENGTH).contains(&len) {
        return Err(ProtocolError::violation(format!(
            "invalid length of startup packet: {len} bytes (must be between 8 and {MAX_STARTUP_PACKET_LENGTH})"
        )));
    }
    Ok(len)
}

/// Decodes a whole startup-phase packet (length prefix included).
pub fn parse_startup_packet(packet: &[u8]) -> Result<StartupRequest, ProtocolError> {
    let header: [u8; 4] = packet
        .get(..4)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| ProtocolError::violation("incomplete startup packet"))?;
    let len = startup_packet_len(header)?;
    if packet.len() != len {
        return Err(ProtocolError::violation("incomplete startup packet"));
    }
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    let body = &packet[8..];
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if !body.is_empty() => Err(
            ProtocolError::violation("invalid length of encryption request packet"),
        ),
        SSL_REQUEST_CODE => Ok(StartupRequest::Ssl),
        GSSENC_REQUEST_CODE => Ok(StartupRequest::GssEnc),
        CANCEL_REQUEST_CODE => {
            let b: [u8; 8] = body
                .try_into()
                .map_err(|_| ProtocolError::violation("invalid length of cancel request packet"))?;
            Ok(StartupRequest::Cancel {
                pid: i32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                secret: i32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != PROTOCOL_MAJOR {
                return Err(ProtocolError {
                    sqlstate: sqlstate::FEATURE_NOT_SUPPORTED,
                    message: format!(
                        "unsupported frontend protocol {major}.{minor}: server supports {PROTOCOL_MAJOR}.0 to {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}"
                    ),
                });
            }
            Ok(StartupRequest::Startup(StartupMessage {
                major,
                minor,
                params: parse_params(body)?,
            }))
        }
    }
}

/// `name\0value\0 … \0`: the parameter list must end with an empty name, and both names and
/// values must be valid UTF-8 (we only accept UTF-8 clients; PostgreSQL itself is laxer,
/// but every parameter we act on is an identifier).
fn parse_params(mut body: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    let mut params = Vec::new();
    loop {
        let (name, rest) = take_cstr(body)?;
        if name.is_empty() {
            if !rest.is_empty() {
                return Err(ProtocolError::violation(
                    "invalid startup packet layout: expected terminator as last byte",
                ));
            }
            return Ok(params);
        }
        let (value, rest) = take_cstr(rest)?;
        params.push((name.to_owned(), value.to_owned()));
        body = rest;
    }
}

fn take_cstr(buf: &[u8]) -> Result<(&str, &[u8]), ProtocolError> {
    let nul = buf.iter().position(|&b| b == 0).ok_or_else(|| {
        ProtocolError::violation("invalid startup packet layout: expected terminator as last byte")
    })?;
    let s = std::str::from_utf8(&buf[..nul])
        .map_err(|_| ProtocolError::violation("invalid startup packet: parameter is not UTF-8"))?;
    Ok((s, &buf[nul + 1..]))
}

/// Encodes a v3.0 StartupMessage (used by the proxy to log in upstream).
pub fn encode_startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut out = vec![0, 0, 0, 0];
    out.extend_from_slice(
        &((u32::from(PROTOCOL_MAJOR) << 16) | u32::from(PROTOCOL_MINOR)).to_be_bytes(),
    );
    for (k, v) in params {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out.push(0);
    let len = out.len() as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// `PasswordMessage`: the answer to `AuthenticationCleartextPassword` (on RDS, the IAM token).
pub fn encode_password(password: &str) -> Vec<u8> {
    let len = 4 + password.len() + 1;
    let mut out = Vec::with_capacity(1 + len);
    out.push(b'p');
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.extend_from_slice(password.as_bytes());
    out.push(0);
    out
}

pub fn encode_ssl_request() -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&8u32.to_be_bytes());
    out[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    out
}

pub fn encode_cancel_request(pid: i32, secret: i32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&16u32.to_be_bytes());
    out[4..8].copy_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    out[8..12].copy_from_slice(&pid.to_be_bytes());
    out[12..].copy_from_slice(&secret.to_be_bytes());
    out
}

/// Appends one typed message: tag, length (self-inclusive), body.
fn push_message(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
}

pub fn authentication_ok(out: &mut Vec<u8>) {
    push_message(out, b'R', &0i32.to_be_bytes());
}

pub fn backend_key_data(out: &mut Vec<u8>, pid: i32, secret: i32) {
    let mut body = [0u8; 8];
    body[..4].copy_from_slice(&pid.to_be_bytes());
    body[4..].copy_from_slice(&secret.to_be_bytes());
    push_message(out, b'K', &body);
}

/// `NegotiateProtocolVersion`: the newest minor we support and the options we ignored.
pub fn negotiate_protocol_version(out: &mut Vec<u8>, options: &[String]) {
    let mut body = Vec::new();
    body.extend_from_slice(
        &((u32::from(PROTOCOL_MAJOR) << 16) | u32::from(PROTOCOL_MINOR)).to_be_bytes(),
    );
    body.extend_from_slice(&(options.len() as u32).to_be_bytes());
    for o in options {
        body.extend_from_slice(o.as_bytes());
        body.push(0);
    }
    push_message(out, b'v', &body);
}

pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

pub fn terminate() -> [u8; 5] {
    TERMINATE
}

/// A simple-protocol `Query`.
pub fn query(sql: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(sql.len() + 6);
    out.push(b'Q');
    out.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    out.extend_from_slice(sql.as_bytes());
    out.push(0);
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

/// An `ErrorResponse` the gateway sends in the server's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse {
    pub severity: Severity,
    pub sqlstate: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ErrorResponse {
    pub fn fatal(sqlstate: &str, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Fatal,
            sqlstate: sqlstate.to_owned(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let sev = match self.severity {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        };
        let mut body = Vec::with_capacity(64 + self.message.len());
        let mut field = |tag: u8, v: &str| {
            body.push(tag);
            // A NUL inside a field would end it early and desynchronise the client.
            body.extend(v.bytes().filter(|&b| b != 0));
            body.push(0);
        };
        field(b'S', sev);
        field(b'V', sev);
        field(b'C', &self.sqlstate);
        field(b'M', &self.message);
        if let Some(d) = &self.detail {
            field(b'D', d);
        }
        if let Some(h) = &self.hint {
            field(b'H', h);
        }
        body.push(0);
        let mut out = Vec::with_capacity(body.len() + 5);
        push_message(&mut out, b'E', &body);
        out
    }

    /// Parses the body of an `E` (or `N`) message; unknown fields are skipped.
    pub fn parse(body: &[u8]) -> Option<Self> {
        let mut e = ErrorResponse::fatal("", "");
        let mut rest = body;
        while let Some((&tag, tail)) = rest.split_first() {
            if tag == 0 {
                break;
            }
            let nul = tail.iter().position(|&b| b == 0)?;
            let value = String::from_utf8_lossy(&tail[..nul]).into_owned();
            match tag {
                b'V' => {
                    e.severity = if value == "FATAL" || value == "PANIC" {
                        Severity::Fatal
                    } else {
                        Severity::Error
                    }
                }
                b'C' => e.sqlstate = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                _ => {}
            }
            rest = &tail[nul + 1..];
        }
        Some(e)
    }
}

/// Tracks message boundaries in a typed-message byte stream (either direction, after
/// start-up) without copying it: the relay tells from it when the server is idle
/// (`ReadyForQuery` with status `I`) for a clean drain, and when the client's last bytes
/// are a `Terminate`, so the server session can be kept for reuse.
#[derive(Debug, Default)]
pub struct MessageScanner {
    /// Header bytes of a message whose header was split across reads.
    header: [u8; 5],
    header_len: usize,
    /// Body bytes still to skip in the current message.
    remaining: usize,
    /// Tag of the current message, and its first body byte for `Z`.
    tag: u8,
    /// Status byte of the last complete `ReadyForQuery`, if the stream ended right after it.
    idle_status: Option<u8>,
    /// Where the current (or last) message began in the latest chunk; `None` when it began
    /// in an earlier one.
    start: Option<usize>,
}

impl MessageScanner {
    /// Feeds the next chunk; afterwards [`Self::ready_status`] tells whether the chunk ended
    /// exactly after a `ReadyForQuery`.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), ProtocolError> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.idle_status = None;
        self.start = None;
        let total = chunk.len();
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(chunk.len());
                if self.tag == b'Z' && self.remaining == 1 {
                    self.idle_status = Some(chunk[0]);
                }
                self.remaining -= take;
                chunk = &chunk[take..];
                if self.remaining == 0 && self.tag != b'Z' {
                    self.idle_status = None;
                }
                continue;
            }
            self.idle_status = None;
            if self.header_len == 0 {
                self.start = Some(total - chunk.len());
            }
            let take = (5 - self.header_len).min(chunk.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&chunk[..take]);
            self.header_len += take;
            chunk = &chunk[take..];
            if self.header_len == 5 {
                self.header_len = 0;
                self.tag = self.header[0];
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                if len < 4 {
                    return Err(ProtocolError::violation(format!(
                        "invalid message length {len}"
                    )));
                }
                self.remaining = len - 4;
            }
        }
        Ok(())
    }

    /// `Some(status)` when everything fed so far ends exactly at a `ReadyForQuery`.
    pub fn ready_status(&self) -> Option<u8> {
        if self.at_boundary() {
            self.idle_status
        } else {
            None
        }
    }

    /// Everything fed so far is whole messages.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0 && self.header_len == 0
    }

    /// When the last chunk fed ended exactly with a whole message of type `tag` that began
    /// in that chunk: where in the chunk it began.
    pub fn ends_with(&self, tag: u8) -> Option<usize> {
        if self.at_boundary() && self.tag == tag {
            self.start
        } else {
            None
        }
    }
}

/// One typed message inside a buffer: (tag, body, bytes used including the header).
pub type Frame<'a> = (u8, &'a [u8], usize);

/// Splits one complete typed message off the front of `buf`: `Ok(None)` when more bytes
/// are needed.
pub fn split_message(buf: &[u8], max_len: usize) -> Result<Option<Frame<'_>>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if !(4..=max_len).contains(&len) {
        return Err(ProtocolError::violation(format!(
            "invalid message length {len} for message type {:?}",
            buf[0] as char
        )));
    }
    if buf.len() < len + 1 {
        return Ok(None);
    }
    Ok(Some((buf[0], &buf[5..len + 1], len + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_bytes(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
        let mut p = encode_startup(params);
        p[4..8].copy_from_slice(&version.to_be_bytes());
        p
    }

    #[test]
    fn parses_startup_message_params_in_order() {
        let p = encode_startup(&[("user", "alice"), ("database", "app")]);
        let StartupRequest::Startup(m) = parse_startup_packet(&p).unwrap() else {
            panic!("not a startup message")
        };
        assert_eq!((m.major, m.minor), (3, 0));
        assert_eq!(m.param("user"), Some("alice"));
        assert_eq!(m.param("database"), Some("app"));
        assert!(!m.needs_negotiation());
    }

    #[test]
    fn newer_minor_and_pq_options_need_negotiation() {
        let p = startup_bytes((3 << 16) | 2, &[("user", "a"), ("_pq_.foo", "1")]);
        let StartupRequest::Startup(m) = parse_startup_packet(&p).unwrap() else {
            panic!("not a startup message")
        };
        assert!(m.needs_negotiation());
        assert_eq!(m.protocol_options(), vec!["_pq_.foo".to_owned()]);
        let mut out = Vec::new();
        negotiate_protocol_version(&mut out, &m.protocol_options());
        assert_eq!(out[0], b'v');
        assert_eq!(&out[5..9], &(3u32 << 16).to_be_bytes());
        assert_eq!(&out[9..13], &1u32.to_be_bytes());
        assert_eq!(&out[13..], b"_pq_.foo\0");
    }

    #[test]
    fn rejects_bad_lengths_like_postgres() {
        assert_eq!(
            startup_packet_len(7u32.to_be_bytes()).unwrap_err().sqlstate,
            "08P01"
        );
        assert!(startup_packet_len(10_000u32.to_be_bytes()).is_ok());
        let e = startup_packet_len(10_001u32.to_be_bytes()).unwrap_err();
        assert!(
            e.message.contains("invalid length of startup packet"),
            "{e}"
        );
    }

    #[test]
    fn rejects_unknown_protocol_and_malformed_params() {
        let p = startup_bytes(2 << 16, &[("user", "a")]);
        let e = parse_startup_packet(&p).unwrap_err();
        assert_eq!(e.sqlstate, "0A000");
        assert!(
            e.message.contains("unsupported frontend protocol 2.0"),
            "{e}"
        );

        let mut p = encode_startup(&[("user", "a")]);
        p.pop(); // drop the terminator
        let len = p.len() as u32;
        p[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(parse_startup_packet(&p).unwrap_err().sqlstate, "08P01");
    }

    #[test]
    fn parses_negotiation_and_cancel_requests() {
        assert_eq!(
            parse_startup_packet(&encode_ssl_request()).unwrap(),
            StartupRequest::Ssl
        );
        let c = encode_cancel_request(42, -7);
        assert_eq!(
            parse_startup_packet(&c).unwrap(),
            StartupRequest::Cancel {
                pid: 42,
                secret: -7
            }
        );
    }

    #[test]
    fn error_response_round_trips() {
        let e = ErrorResponse::fatal("28000", "no\0pe")
            .with_hint("ask")
            .with_detail("d");
        let bytes = e.encode();
        let (tag, body, used) = split_message(&bytes, 1 << 16).unwrap().unwrap();
        assert_eq!((tag, used), (b'E', bytes.len()));
        let back = ErrorResponse::parse(body).unwrap();
        assert_eq!(back.sqlstate, "28000");
        assert_eq!(back.message, "nope");
        assert_eq!(back.hint.as_deref(), Some("ask"));
        assert_eq!(back.severity, Severity::Fatal);
    }

    #[test]
    fn scanner_finds_ready_for_query_across_split_reads() {
        let mut stream = Vec::new();
        push_message(&mut stream, b'C', b"SELECT 1\0");
        push_message(&mut stream, b'Z', b"I");
        for split in 0..=stream.len() {
            let mut s = MessageScanner::default();
            s.feed(&stream[..split]).unwrap();
            s.feed(&stream[split..]).unwrap();
            assert_eq!(s.ready_status(), Some(b'I'), "split at {split}");
        }
        let mut s = MessageScanner::default();
        s.feed(&stream[..stream.len() - 1]).unwrap();
        assert_eq!(s.ready_status(), None);
        let mut more = stream.clone();
        push_message(&mut more, b'D', b"xx");
        let mut s = MessageScanner::default();
        s.feed(&more).unwrap();
        assert_eq!(s.ready_status(), None);
        assert!(MessageScanner::default().feed(&[b'Z', 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn scanner_finds_a_trailing_terminate() {
        let mut stream = Vec::new();
        push_message(&mut stream, b'Q', b"select 1\0");
        let query_len = stream.len();
        stream.extend_from_slice(&terminate());
        // In one chunk: Terminate starts right after the query.
        let mut s = MessageScanner::default();
        s.feed(&stream).unwrap();
        assert_eq!(s.ends_with(b'X'), Some(query_len));
        // Alone in the next chunk.
        let mut s = MessageScanner::default();
        s.feed(&stream[..query_len]).unwrap();
        assert_eq!(s.ends_with(b'X'), None);
        s.feed(&stream[query_len..]).unwrap();
        assert_eq!(s.ends_with(b'X'), Some(0));
        // Split inside the Terminate: it did not begin in the last chunk.
        let mut s = MessageScanner::default();
        s.feed(&stream[..query_len + 2]).unwrap();
        s.feed(&stream[query_len + 2..]).unwrap();
        assert_eq!(s.ends_with(b'X'), None);
        assert!(s.at_boundary());
        // An 'X' byte inside a query body is not a Terminate.
        let mut q = Vec::new();
        push_message(&mut q, b'Q', b"X\0\0\0\x04");
        let mut s = MessageScanner::default();
        s.feed(&q).unwrap();
        assert_eq!(s.ends_with(b'X'), None);
    }
}
