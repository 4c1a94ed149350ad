//! The tunnel stream protocol (`isthmus/1`), spoken on every QUIC bidirectional stream between
//! a client (node agent, test) and an east-west gateway. Documented in docs/protocol.md.
//!
//! A stream starts with a bounded, length-prefixed request header naming the target; the
//! gateway answers with a typed result before any payload; then bytes flow both ways.
//! Decoding is a pure, bounded function over a byte slice, ready for fuzzing.
//!
//! ```text
//! request  = version:u8 (=1) | body_len:u16be (<= 512) | body
//! body     = ns_len:u8 ns | svc_len:u8 svc | port:u16be | cluster_len:u8 cluster
//!            | request_id:16 bytes | traceparent_len:u8 traceparent
//! response = version:u8 (=1) | code:u8 | msg_len:u16be (<= 256) | msg (UTF-8)
//! ```

use std::fmt;

/// The QUIC ALPN of this protocol version. Later versions get `isthmus/2`, … and both sides
/// offer every version they speak, most preferred first; TLS picks the common one.
pub const ALPN: &[u8] = b"isthmus/1";
/// The header version byte.
pub const VERSION: u8 = 1;
/// Largest request body.
pub const MAX_REQUEST_BODY: usize = 512;
/// Largest request header on the wire.
pub const MAX_REQUEST_HEADER: usize = 3 + MAX_REQUEST_BODY;
/// Largest response message.
pub const MAX_RESPONSE_MESSAGE: usize = 256;
/// Longest namespace, service or cluster name (a DNS label).
pub const MAX_NAME: usize = 63;
/// Longest W3C `traceparent`.
pub const MAX_TRACEPARENT: usize = 128;

/// Why a header could not be decoded (or encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The version byte is not one this side speaks.
    #[error("unsupported tunnel header version {0}")]
    Version(u8),
    /// The declared length exceeds the bound.
    #[error("tunnel header body of {0} bytes exceeds {MAX_REQUEST_BODY}")]
    TooLong(usize),
    /// The body ends before a field does.
    #[error("tunnel header truncated in {0}")]
    Truncated(&'static str),
    /// The body has bytes after the last field.
    #[error("tunnel header has {0} trailing bytes")]
    Trailing(usize),
    /// A name is not a DNS label.
    #[error("{field} {value:?} is not a DNS label (lowercase letters, digits, '-', at most 63)")]
    BadName {
        /// Which field.
        field: &'static str,
        /// The offending value (lossy).
        value: String,
    },
    /// Port 0.
    #[error("port 0 is not a valid target port")]
    BadPort,
    /// The traceparent is not printable ASCII or too long.
    #[error("traceparent is not printable ASCII of at most {MAX_TRACEPARENT} bytes")]
    BadTraceparent,
    /// Unknown result code in a response.
    #[error("unknown tunnel result code {0}")]
    UnknownCode(u8),
    /// The response message is not UTF-8 or too long.
    #[error("tunnel response message is malformed")]
    BadMessage,
}

/// Where a stream goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Kubernetes namespace of the service.
    pub namespace: String,
    /// Service name.
    pub service: String,
    /// Service port.
    pub port: u16,
    /// A specific cluster, or `None` for any.
    pub cluster: Option<String>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}:{}", self.service, self.namespace, self.port)?;
        if let Some(cluster) = &self.cluster {
            write!(f, "@{cluster}")?;
        }
        Ok(())
    }
}

/// The request header of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRequest {
    /// The target.
    pub target: Target,
    /// Request ID, for logs on both sides.
    pub request_id: u128,
    /// W3C trace context, if any.
    pub traceparent: Option<String>,
}

/// The gateway's answer, sent before any payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResultCode {
    /// Connected to an endpoint; payload follows.
    Accepted = 0,
    /// The service is not exported by this cluster.
    UnknownService = 1,
    /// The caller may not reach this service.
    Denied = 2,
    /// No endpoint accepted the connection.
    NoHealthyEndpoint = 3,
    /// Too many streams; retry elsewhere or later.
    Overloaded = 4,
    /// The request header was malformed.
    Malformed = 5,
}

impl ResultCode {
    /// A stable low-cardinality label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::UnknownService => "unknown_service",
            Self::Denied => "denied",
            Self::NoHealthyEndpoint => "no_healthy_endpoint",
            Self::Overloaded => "overloaded",
            Self::Malformed => "malformed",
        }
    }

    fn from_u8(code: u8) -> Result<Self, HeaderError> {
        Ok(match code {
            0 => Self::Accepted,
            1 => Self::UnknownService,
            2 => Self::Denied,
            3 => Self::NoHealthyEndpoint,
            4 => Self::Overloaded,
            5 => Self::Malformed,
            other => return Err(HeaderError::UnknownCode(other)),
        })
    }
}

impl fmt::Display for ResultCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The response header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamResponse {
    /// The result.
    pub code: ResultCode,
    /// Human-readable detail (empty when accepted).
    pub message: String,
}

/// Outcome of decoding from a buffer that may not hold the whole header yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// Decoded; the header used `consumed` bytes.
    Complete(T, usize),
    /// At least this many bytes in total are needed.
    Incomplete(usize),
}

/// True for a DNS-1123 label.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], HeaderError> {
        if self.buf.len() < n {
            return Err(HeaderError::Truncated(field));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, HeaderError> {
        Ok(self.take(1, field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, HeaderError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn short_bytes(&mut self, field: &'static str) -> Result<&'a [u8], HeaderError> {
        let len = usize::from(self.u8(field)?);
        self.take(len, field)
    }

    fn name(&mut self, field: &'static str, optional: bool) -> Result<Option<String>, HeaderError> {
        let raw = self.short_bytes(field)?;
        if raw.is_empty() && optional {
            return Ok(None);
        }
        match std::str::from_utf8(raw) {
            Ok(s) if is_dns_label(s) => Ok(Some(s.to_owned())),
            _ => Err(HeaderError::BadName {
                field,
                value: String::from_utf8_lossy(raw).into_owned(),
            }),
        }
    }
}

/// Decodes a request header from the start of `buf`. Never reads past
/// [`MAX_REQUEST_HEADER`] bytes.
pub fn decode_request(buf: &[u8]) -> Result<Decoded<StreamRequest>, HeaderError> {
    if buf.is_empty() {
        return Ok(Decoded::Incomplete(3));
    }
    if buf[0] != VERSION {
        return Err(HeaderError::Version(buf[0]));
    }
    if buf.len() < 3 {
        return Ok(Decoded::Incomplete(3));
    }
    let len = usize::from(u16::from_be_bytes([buf[1], buf[2]]));
    if len > MAX_REQUEST_BODY {
        return Err(HeaderError::TooLong(len));
    }
    if buf.len() < 3 + len {
        return Ok(Decoded::Incomplete(3 + len));
    }
    let mut r = Reader {
        buf: &buf[3..3 + len],
    };
    let namespace = r.name("namespace", false)?.unwrap_or_default();
    let service = r.name("service", false)?.unwrap_or_default();
    let port = r.u16("port")?;
    if port == 0 {
        return Err(HeaderError::BadPort);
    }
    let cluster = r.name("cluster", true)?;
    let id = r.take(16, "request_id")?;
    let mut id_bytes = [0u8; 16];
    id_bytes.copy_from_slice(id);
    let tp = r.short_bytes("traceparent")?;
    let traceparent = if tp.is_empty() {
        None
    } else if tp.len() <= MAX_TRACEPARENT && tp.iter().all(|b| b.is_ascii_graphic()) {
        Some(String::from_utf8_lossy(tp).into_owned())
    } else {
        return Err(HeaderError::BadTraceparent);
    };
    if !r.buf.is_empty() {
        return Err(HeaderError::Trailing(r.buf.len()));
    }
    Ok(Decoded::Complete(
        StreamRequest {
            target: Target {
                namespace,
                service,
                port,
                cluster,
            },
            request_id: u128::from_be_bytes(id_bytes),
            traceparent,
        },
        3 + len,
    ))
}

fn push_name(out: &mut Vec<u8>, field: &'static str, name: &str) -> Result<(), HeaderError> {
    if !is_dns_label(name) {
        return Err(HeaderError::BadName {
            field,
            value: name.to_owned(),
        });
    }
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

/// Encodes a request header, validating every field as the decoder would.
pub fn encode_request(request: &StreamRequest) -> Result<Vec<u8>, HeaderError> {
    let t = &request.target;
    if t.port == 0 {
        return Err(HeaderError::BadPort);
    }
    let mut body = Vec::with_capacity(64);
    push_name(&mut body, "namespace", &t.namespace)?;
    push_name(&mut body, "service", &t.service)?;
    body.extend_from_slice(&t.port.to_be_bytes());
    match &t.cluster {
        Some(cluster) => push_name(&mut body, "cluster", cluster)?,
        None => body.push(0),
    }
    body.extend_from_slice(&request.request_id.to_be_bytes());
    match &request.traceparent {
        Some(tp)
            if tp.len() <= MAX_TRACEPARENT
                && tp.bytes().all(|b| b.is_ascii_graphic())
                && !tp.is_empty() =>
        {
            body.push(tp.len() as u8);
            body.extend_from_slice(tp.as_bytes());
        }
        Some(_) => return Err(HeaderError::BadTraceparent),
        None => body.push(0),
    }
    if body.len() > MAX_REQUEST_BODY {
        return Err(HeaderError::TooLong(body.len()));
    }
    let mut out = Vec::with_capacity(3 + body.len());
    out.push(VERSION);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Encodes a response header (the message is truncated to the bound at a char boundary).
pub fn encode_response(response: &StreamResponse) -> Vec<u8> {
    let mut message = response.message.as_str();
    if message.len() > MAX_RESPONSE_MESSAGE {
        let mut end = MAX_RESPONSE_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message = &message[..end];
    }
    let mut out = Vec::with_capacity(4 + message.len());
    out.push(VERSION);
    out.push(response.code as u8);
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

/// Decodes a response header from the start of `buf`.
pub fn decode_response(buf: &[u8]) -> Result<Decoded<StreamResponse>, HeaderError> {
    if buf.is_empty() {
        return Ok(Decoded::Incomplete(4));
    }
    if buf[0] != VERSION {
        return Err(HeaderError::Version(buf[0]));
    }
    if buf.len() < 4 {
        return Ok(Decoded::Incomplete(4));
    }
    let code = ResultCode::from_u8(buf[1])?;
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    if len > MAX_RESPONSE_MESSAGE {
        return Err(HeaderError::BadMessage);
    }
    if buf.len() < 4 + len {
        return Ok(Decoded::Incomplete(4 + len));
    }
    let message = std::str::from_utf8(&buf[4..4 + len])
        .map_err(|_| HeaderError::BadMessage)?
        .to_owned();
    Ok(Decoded::Complete(StreamResponse { code, message }, 4 + len))
}

/// Reads one header with `decode` from `reader`, never buffering more than `max` bytes and
/// never consuming payload bytes beyond the header.
pub async fn read_header<R, T>(
    reader: &mut R,
    max: usize,
    decode: fn(&[u8]) -> Result<Decoded<T>, HeaderError>,
) -> Result<T, ReadError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(64);
    let mut want = 1;
    loop {
        if want > max {
            return Err(ReadError::Header(HeaderError::TooLong(want)));
        }
        let have = buf.len();
        buf.resize(want, 0);
        reader
            .read_exact(&mut buf[have..want])
            .await
            .map_err(ReadError::Io)?;
        match decode(&buf).map_err(ReadError::Header)? {
            Decoded::Complete(value, _) => return Ok(value),
            Decoded::Incomplete(needed) => want = needed,
        }
    }
}

/// Why reading a header failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream failed or ended early.
    #[error("reading tunnel header: {0}")]
    Io(std::io::Error),
    /// The header is malformed.
    #[error(transparent)]
    Header(HeaderError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> StreamRequest {
        StreamRequest {
            target: Target {
                namespace: "demo".into(),
                service: "echo".into(),
                port: 8080,
                cluster: Some("east".into()),
            },
            request_id: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        }
    }

    #[test]
    fn round_trips_and_reports_incomplete_prefixes() {
        let bytes = encode_request(&request()).unwrap();
        assert_eq!(
            decode_request(&bytes).unwrap(),
            Decoded::Complete(request(), bytes.len())
        );
        for cut in 0..bytes.len() {
            match decode_request(&bytes[..cut]).unwrap() {
                Decoded::Incomplete(needed) => assert!(needed > cut && needed <= bytes.len()),
                Decoded::Complete(..) => panic!("complete at {cut}"),
            }
        }
        let mut with_payload = bytes.clone();
        with_payload.extend_from_slice(b"payload");
        assert_eq!(
            decode_request(&with_payload).unwrap(),
            Decoded::Complete(request(), bytes.len())
        );
        let response = StreamResponse {
            code: ResultCode::Denied,
            message: "no".into(),
        };
        let bytes = encode_response(&response);
        assert_eq!(
            decode_response(&bytes).unwrap(),
            Decoded::Complete(response, bytes.len())
        );
    }

    #[test]
    fn rejects_malformed_headers() {
        let good = encode_request(&request()).unwrap();
        assert_eq!(decode_request(&[2]).unwrap_err(), HeaderError::Version(2));
        assert_eq!(
            decode_request(&[1, 0xff, 0xff]).unwrap_err(),
            HeaderError::TooLong(65535)
        );
        let mut trailing = good.clone();
        trailing.push(0);
        let len = (good.len() - 3 + 1) as u16;
        trailing[1..3].copy_from_slice(&len.to_be_bytes());
        assert_eq!(
            decode_request(&trailing).unwrap_err(),
            HeaderError::Trailing(1)
        );
        let mut bad_name = good.clone();
        bad_name[4] = b'D';
        assert!(matches!(
            decode_request(&bad_name),
            Err(HeaderError::BadName {
                field: "namespace",
                ..
            })
        ));
        let mut short = good.clone();
        short[1..3].copy_from_slice(&5u16.to_be_bytes());
        assert!(matches!(
            decode_request(&short[..8]),
            Err(HeaderError::Truncated(_))
        ));
        assert_eq!(
            decode_response(&[1, 9, 0, 0]).unwrap_err(),
            HeaderError::UnknownCode(9)
        );
        let mut zero_port = request();
        zero_port.target.port = 0;
        assert_eq!(
            encode_request(&zero_port).unwrap_err(),
            HeaderError::BadPort
        );
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        // A small deterministic fuzz: every prefix of pseudo-random inputs.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let len = (state % 600) as usize;
            let mut input = Vec::with_capacity(len);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                input.push(state as u8);
            }
            if !input.is_empty() {
                input[0] = VERSION;
            }
            let _ = decode_request(&input);
            let _ = decode_response(&input);
        }
    }

    #[tokio::test]
    async fn reads_exactly_the_header() {
        let mut bytes = encode_request(&request()).unwrap();
        bytes.extend_from_slice(b"rest");
        let mut reader = &bytes[..];
        let got = read_header(&mut reader, MAX_REQUEST_HEADER, decode_request)
            .await
            .unwrap();
        assert_eq!(got, request());
        assert_eq!(reader, b"rest");
    }
}
