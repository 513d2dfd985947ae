//! The HTTP/1.1 wire format, as much of it as a webhook receiver needs: the request head
//! (parsed by httparse), a body framed by Content-Length or chunked, the query-string secret,
//! and responses. Every read is bounded in size and in time; nothing here knows about the
//! queue or the main loop.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

/// The largest request head (request line and headers) read; beyond it: 431. An Evolution
/// delivery's head is well under 1 KiB; 16 KiB leaves room for gateway headers and long URLs.
pub(super) const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The most headers a request may carry (the size of httparse's array); beyond it: 431.
pub(super) const MAX_HEADERS: usize = 64;
/// How much one read takes from the socket (a buffer on the connection thread's stack).
const READ_CHUNK: usize = 8 * 1024;
/// The longest chunk-size line of a chunked body, extensions included.
const MAX_CHUNK_LINE: usize = 1024;
/// A body's first allocation: a claimed Content-Length alone does not make the listener
/// allocate the whole size; the buffer grows as the bytes actually arrive.
const FIRST_ALLOCATION: usize = 64 * 1024;
/// After an answer that closes the connection, what is still read (and thrown away) before
/// closing, at most: closing a socket with unread input makes the kernel send a reset, which
/// can destroy the answer before the client reads it.
const LINGER_BYTES: usize = 256 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(2);

/// A byte stream with a read timeout: a TCP connection, or memory in unit tests.
pub(super) trait Stream: Read + Write {
    fn set_timeout(&mut self, timeout: Duration) -> io::Result<()>;
}

/// A shared reference, so the connection thread's owner keeps the socket (and closes it only
/// after giving its slot back: see `slots`).
impl Stream for &TcpStream {
    fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

/// How long each part of a request may take. Each is a deadline, not an idle time: a client
/// sending one byte just before every read timeout cannot hold a connection for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Timeouts {
    /// One read (so an idle keep-alive connection is closed after it).
    pub read: Duration,
    /// A whole head: from the accept for a connection's first request, from its first byte
    /// for the next ones on a kept-alive connection.
    pub head: Duration,
    /// A whole body, from the end of its head.
    pub body: Duration,
}

/// Why no request could be read, and so what the connection answers before it closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The peer closed, or stayed idle past the read timeout, with no request begun (or
    /// mid-request, when no answer can be read anyway): close without a word.
    Gone,
    /// A request began but did not arrive in time: 408.
    TimedOut,
    /// 431.
    HeadTooLarge,
    /// 413.
    BodyTooLarge,
    /// A POST with neither Content-Length nor chunked encoding: 411.
    LengthRequired,
    /// A transfer coding other than chunked: 501.
    NotImplemented(&'static str),
    /// 400.
    Malformed(&'static str),
}

/// How the body of a request is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// No Content-Length, no Transfer-Encoding: no body (for a POST: 411).
    Absent,
    Length(u64),
    Chunked,
}

impl Framing {
    /// Whether a body may follow the head; a request whose body is not read must close the
    /// connection, as the stream would no longer be at the start of the next request.
    pub(super) fn has_body(self) -> bool {
        !matches!(self, Framing::Absent | Framing::Length(0))
    }
}

/// A request head, owned (httparse borrows from the read buffer, which moves on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Head {
    pub method: String,
    /// The request target as sent: `/hook/qrcode-updated?evoq_secret=...`.
    pub target: String,
    /// HTTP/1.1 (true) or HTTP/1.0.
    pub http11: bool,
    /// Whether the client wants the connection kept open after this request.
    pub keep_alive: bool,
    pub framing: Framing,
    /// `Expect: 100-continue` (HTTP/1.1 only): the client waits for `100 Continue` before it
    /// sends the body.
    pub expect_continue: bool,
    /// The first non-empty secret header, if any.
    pub secret: Option<String>,
}

/// Parses a complete request head at the start of `bytes`: Ok(None) when more bytes are
/// needed, Ok(Some((head, length of the head))) once it is all there.
pub(super) fn parse_head(
    bytes: &[u8],
    secret_header: &str,
) -> Result<Option<(Head, usize)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
        Err(_) => return Err(Refusal::Malformed("malformed request head")),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Refusal::Malformed("malformed request head"));
    };
    let http11 = version == 1;
    let (mut close, mut keep) = (false, false);
    let mut expect_continue = false;
    let mut length: Option<u64> = None;
    let mut codings: Vec<String> = Vec::new();
    let mut secret = None;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).ok().map(str::trim);
        if h.name.eq_ignore_ascii_case("connection") {
            for token in value.unwrap_or("").split(',').map(str::trim) {
                close |= token.eq_ignore_ascii_case("close");
                keep |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let v = value.unwrap_or("");
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Refusal::Malformed("invalid Content-Length"));
            }
            let n: u64 = v
                .parse()
                .map_err(|_| Refusal::Malformed("invalid Content-Length"))?;
            // Two different lengths are the classic request-smuggling trick.
            if length.is_some_and(|l| l != n) {
                return Err(Refusal::Malformed("conflicting Content-Length headers"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let v = value.unwrap_or("invalid");
            codings.extend(
                v.split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty()),
            );
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue |=
                http11 && value.is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        } else if h.name.eq_ignore_ascii_case(secret_header) && secret.is_none() {
            let v = String::from_utf8_lossy(h.value).trim().to_string();
            secret = (!v.is_empty()).then_some(v);
        }
    }
    let framing = match (codings.is_empty(), length) {
        (true, None) => Framing::Absent,
        (true, Some(n)) => Framing::Length(n),
        // Both: which one delimits the body is where front ends and back ends disagree.
        (false, Some(_)) => {
            return Err(Refusal::Malformed(
                "both Content-Length and Transfer-Encoding",
            ))
        }
        (false, None) if codings == ["chunked"] => Framing::Chunked,
        (false, None) => {
            return Err(Refusal::NotImplemented(
                "only the chunked transfer coding is supported",
            ))
        }
    };
    let keep_alive = if http11 { !close } else { keep && !close };
    let head = Head {
        method: method.to_string(),
        target: target.to_string(),
        http11,
        keep_alive,
        framing,
        expect_continue,
        secret,
    };
    Ok(Some((head, len)))
}

/// The inbound side of a connection: the stream and the bytes read from it but not yet used
/// (the start of a body, or of a pipelined request).
pub(super) struct Inbound<S: Stream> {
    stream: S,
    buf: Vec<u8>,
    timeouts: Timeouts,
    /// When the part being read (head or body) must be complete.
    deadline: Option<Instant>,
}

impl<S: Stream> Inbound<S> {
    pub(super) fn new(stream: S, timeouts: Timeouts) -> Inbound<S> {
        Inbound {
            stream,
            buf: Vec::new(),
            timeouts,
            deadline: None,
        }
    }

    pub(super) fn stream(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Reads the next request head, which must be complete within the head timeout of
    /// `since` (the accept, for a connection's first request), else of its first byte. An
    /// idle keep-alive connection ends here, with `Gone`, after one read timeout; so does a
    /// connection that sent nothing before its head deadline.
    pub(super) fn read_head(
        &mut self,
        secret_header: &str,
        since: Option<Instant>,
    ) -> Result<Head, Refusal> {
        self.deadline = since.and_then(|t| t.checked_add(self.timeouts.head));
        loop {
            if !self.buf.is_empty() {
                self.start_clock();
                if let Some((head, len)) = parse_head(&self.buf, secret_header)? {
                    self.buf.drain(..len);
                    return Ok(head);
                }
                if self.buf.len() >= MAX_HEAD_BYTES {
                    return Err(Refusal::HeadTooLarge);
                }
            }
            let room = MAX_HEAD_BYTES - self.buf.len();
            match self.fill(room) {
                Ok(0) => return Err(Refusal::Gone),
                Ok(_) => {}
                Err(e) if is_timeout(&e) && self.buf.is_empty() => return Err(Refusal::Gone),
                Err(e) if is_timeout(&e) => return Err(Refusal::TimedOut),
                Err(_) => return Err(Refusal::Gone),
            }
        }
    }

    /// Reads the body the head announced, refusing it as soon as it is known to exceed `max`;
    /// it must be complete within the body timeout.
    pub(super) fn read_body(&mut self, framing: Framing, max: usize) -> Result<Vec<u8>, Refusal> {
        self.deadline = Instant::now().checked_add(self.timeouts.body);
        let mut body = Vec::new();
        match framing {
            Framing::Absent => {}
            Framing::Length(n) => {
                let n = usize::try_from(n).map_err(|_| Refusal::BodyTooLarge)?;
                if n > max {
                    return Err(Refusal::BodyTooLarge);
                }
                self.take_into(&mut body, n, max)?;
            }
            Framing::Chunked => self.read_chunked(&mut body, max)?,
        }
        Ok(body)
    }

    fn read_chunked(&mut self, body: &mut Vec<u8>, max: usize) -> Result<(), Refusal> {
        loop {
            let line = self.read_line(MAX_CHUNK_LINE)?;
            let size = parse_chunk_size(&line)?;
            if size == 0 {
                // Trailer fields, ignored, bounded like a head.
                let mut trailers = 0;
                loop {
                    let line = self.read_line(MAX_HEAD_BYTES)?;
                    if line.is_empty() {
                        return Ok(());
                    }
                    trailers += line.len() + 2;
                    if trailers > MAX_HEAD_BYTES {
                        return Err(Refusal::HeadTooLarge);
                    }
                }
            }
            let size = usize::try_from(size).map_err(|_| Refusal::BodyTooLarge)?;
            if size > max - body.len() {
                return Err(Refusal::BodyTooLarge);
            }
            self.take_into(body, size, max)?;
            if !self.read_line(2)?.is_empty() {
                return Err(Refusal::Malformed("chunk data not followed by CRLF"));
            }
        }
    }

    /// One line (CRLF or bare LF), without its end; longer than `max`: malformed.
    fn read_line(&mut self, max: usize) -> Result<Vec<u8>, Refusal> {
        let mut searched = 0;
        loop {
            if let Some(i) = self.buf[searched..].iter().position(|&b| b == b'\n') {
                let end = searched + i;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.len() > max {
                    return Err(Refusal::Malformed("line too long in chunked body"));
                }
                return Ok(line);
            }
            searched = self.buf.len();
            if searched > max + 1 {
                return Err(Refusal::Malformed("line too long in chunked body"));
            }
            self.fill_or_refuse(READ_CHUNK)?;
        }
    }

    /// Appends exactly `n` more bytes of body to `body`: first what is buffered, then straight
    /// from the stream. The body grows as bytes arrive, never past `max`.
    fn take_into(&mut self, body: &mut Vec<u8>, n: usize, max: usize) -> Result<(), Refusal> {
        let from_buf = n.min(self.buf.len());
        grow(body, from_buf, max);
        body.extend(self.buf.drain(..from_buf));
        let mut left = n - from_buf;
        let mut chunk = [0u8; READ_CHUNK];
        while left > 0 {
            let want = left.min(READ_CHUNK);
            let got = self.read_some(&mut chunk[..want]).map_err(refusal)?;
            if got == 0 {
                return Err(Refusal::Gone);
            }
            grow(body, got, max);
            body.extend_from_slice(&chunk[..got]);
            left -= got;
        }
        Ok(())
    }

    fn fill_or_refuse(&mut self, max: usize) -> Result<(), Refusal> {
        match self.fill(max) {
            Ok(0) => Err(Refusal::Gone),
            Ok(_) => Ok(()),
            Err(e) => Err(refusal(e)),
        }
    }

    /// Reads at most `max` bytes into the buffer.
    fn fill(&mut self, max: usize) -> io::Result<usize> {
        let mut chunk = [0u8; READ_CHUNK];
        let want = max.min(READ_CHUNK);
        let got = self.read_some(&mut chunk[..want])?;
        if got > 0 {
            self.start_clock();
        }
        self.buf.extend_from_slice(&chunk[..got]);
        Ok(got)
    }

    /// One read, waiting at most a read timeout and never past the current deadline.
    fn read_some(&mut self, into: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut wait = self.timeouts.read;
            if let Some(deadline) = self.deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                wait = wait.min(left);
            }
            self.stream.set_timeout(wait)?;
            match self.stream.read(into) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Starts the head deadline at the head's first byte, unless it runs already.
    fn start_clock(&mut self) {
        if self.deadline.is_none() {
            // None (no deadline) only for a timeout so large the sum overflows.
            self.deadline = Instant::now().checked_add(self.timeouts.head);
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn refusal(e: io::Error) -> Refusal {
    if is_timeout(&e) {
        Refusal::TimedOut
    } else {
        Refusal::Gone
    }
}

/// Makes room for `more` bytes, doubling (amortised) but never past `max`, so the largest
/// body costs `max` bytes and not the next power of two.
fn grow(body: &mut Vec<u8>, more: usize, max: usize) {
    let need = body.len() + more;
    if need > body.capacity() {
        let target = need
            .max(body.capacity() * 2)
            .max(FIRST_ALLOCATION)
            .min(max)
            .max(need);
        body.reserve_exact(target - body.len());
    }
}

/// The size at the start of a chunk-size line (hex, then optional `;extensions`).
fn parse_chunk_size(line: &[u8]) -> Result<u64, Refusal> {
    let bad = Refusal::Malformed("invalid chunk size");
    let end = line.iter().position(|&b| b == b';').unwrap_or(line.len());
    let digits = line[..end].trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err(bad);
    }
    let text = std::str::from_utf8(digits).map_err(|_| bad.clone())?;
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad);
    }
    u64::from_str_radix(text, 16).map_err(|_| bad)
}

/// The path of a request target, without query: `/hook/x?a=b` -> `/hook/x`. An absolute
/// target (`http://host/hook`, as sent through a proxy) gives its path too.
pub(super) fn split_target(target: &str) -> (&str, Option<&str>) {
    let target = target.split('#').next().unwrap_or("");
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    let rest = if lower.starts_with("http://") || lower.starts_with("https://") {
        let after_scheme = &target[target.find("//").map_or(0, |i| i + 2)..];
        let cut = after_scheme.find(['/', '?']).unwrap_or(after_scheme.len());
        &after_scheme[cut..]
    } else {
        target
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    (if path.is_empty() { "/" } else { path }, query)
}

/// The percent-decoded value of the first `name=` parameter of a query string; an empty
/// value counts as absent. `+` stays `+` (evoq writes the secret into the URL as is, and a
/// form-style `+` -> space would break any secret holding one).
pub(super) fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k) == name).then(|| percent_decode(v))
        })
        .filter(|v| !v.is_empty())
}

/// `%XX` -> the byte; a `%` not followed by two hex digits stays as it is. Bytes that are not
/// UTF-8 become U+FFFD (a secret is ASCII, so such a value cannot match anyway).
pub(super) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The reason phrase of the statuses the listener sends.
fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// One whole response, ready for a single write.
pub(super) struct Response {
    pub status: u16,
    /// A JSON document.
    pub body: String,
    pub keep_alive: bool,
    /// The idle time after which the listener closes a kept-alive connection (advertised in
    /// `Keep-Alive: timeout=`, so a client's pool does not reuse a connection about to close).
    pub idle_timeout: Duration,
    /// A response to HEAD: the headers of the GET answer, without its body.
    pub head_only: bool,
}

impl Response {
    pub(super) fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.status,
            reason(self.status),
            self.body.len()
        );
        if self.keep_alive {
            out.push_str(&format!(
                "Connection: keep-alive\r\nKeep-Alive: timeout={}\r\n",
                self.idle_timeout.as_secs().max(1)
            ));
        } else {
            out.push_str("Connection: close\r\n");
        }
        if self.status == 503 {
            out.push_str("Retry-After: 1\r\n");
        }
        if self.status == 405 {
            out.push_str("Allow: GET, HEAD, POST\r\n");
        }
        out.push_str("\r\n");
        if !self.head_only {
            out.push_str(&self.body);
        }
        out.into_bytes()
    }
}

/// Tells a client waiting on `Expect: 100-continue` to send the body.
pub(super) fn send_continue(stream: &mut impl Write) -> io::Result<()> {
    stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    stream.flush()
}

/// Closes a connection after a final answer without destroying that answer: stop sending
/// (the client sees the end of the response), then read and discard what the client still
/// sends, bounded in bytes and time, so the close does not turn into a reset.
pub(super) fn linger_close(mut stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let until = Instant::now() + LINGER_TIME;
    let mut thrown = 0;
    let mut chunk = [0u8; READ_CHUNK];
    while thrown < LINGER_BYTES {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => thrown += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// Like `linger_close`, for the accept thread, which cannot wait: discard only what has
/// already arrived.
pub(super) fn close_without_waiting(mut stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    if stream.set_nonblocking(true).is_ok() {
        let mut chunk = [0u8; READ_CHUNK];
        let mut thrown = 0;
        while thrown < LINGER_BYTES {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => thrown += n,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const SECRET: &str = "x-evoq-secret";

    /// Input from memory, output into memory.
    struct Mem {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
        /// The most one read returns.
        step: usize,
    }

    impl Read for Mem {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.step);
            self.input.read(&mut buf[..n])
        }
    }

    impl Write for Mem {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Stream for Mem {
        fn set_timeout(&mut self, _: Duration) -> io::Result<()> {
            Ok(())
        }
    }

    /// Reads one byte at a time: every boundary of a request is crossed by a read.
    fn inbound(bytes: &[u8]) -> Inbound<Mem> {
        inbound_by(bytes, 1)
    }

    fn inbound_by(bytes: &[u8], step: usize) -> Inbound<Mem> {
        let five = Duration::from_secs(5);
        Inbound::new(
            Mem {
                input: Cursor::new(bytes.to_vec()),
                output: Vec::new(),
                step,
            },
            Timeouts {
                read: five,
                head: five,
                body: five,
            },
        )
    }

    fn head(text: &str) -> Result<Head, Refusal> {
        match parse_head(text.as_bytes(), SECRET)? {
            Some((head, len)) => {
                assert_eq!(len, text.len());
                Ok(head)
            }
            None => panic!("partial"),
        }
    }

    #[test]
    fn a_head_is_read_with_framing_and_connection_wishes() {
        let h = head("POST /hook/qrcode-updated?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nX-Evoq-Secret:  s3 \r\n\r\n").unwrap();
        assert_eq!(h.method, "POST");
        assert_eq!(h.target, "/hook/qrcode-updated?x=1");
        assert_eq!(h.framing, Framing::Length(12));
        assert_eq!(h.secret.as_deref(), Some("s3"));
        assert!(h.keep_alive && h.http11 && !h.expect_continue);

        let h = head("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\nExpect: 100-continue\r\n\r\n").unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.keep_alive && h.expect_continue);

        let h = head("GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(!h.keep_alive && !h.http11);
        assert_eq!(h.framing, Framing::Absent);
        let h = head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\nExpect: 100-continue\r\n\r\n")
            .unwrap();
        assert!(
            h.keep_alive && !h.expect_continue,
            "100-continue is HTTP/1.1"
        );
        let h = head("GET / HTTP/1.1\r\nX-Evoq-Secret: \r\n\r\n").unwrap();
        assert_eq!(h.secret, None, "an empty header is no secret");

        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nHost: a\r\n", SECRET),
            Ok(None)
        );
    }

    #[test]
    fn heads_that_cannot_be_framed_safely_are_refused() {
        let bad = |t: &str| head(t).unwrap_err();
        assert!(matches!(bad("GARBAGE\r\n\r\n"), Refusal::Malformed(_)));
        assert!(matches!(
            bad("POST / HTTP/1.1\r\nBad Header\r\n\r\n"),
            Refusal::Malformed(_)
        ));
        assert!(matches!(
            bad("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Refusal::Malformed(_)
        ));
        assert!(matches!(
            bad("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Refusal::Malformed(_)
        ));
        assert!(matches!(
            bad("POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Refusal::Malformed(_)
        ));
        assert!(matches!(
            bad("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Refusal::NotImplemented(_)
        ));
        // Same length twice is harmless.
        assert_eq!(
            head("POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n")
                .unwrap()
                .framing,
            Framing::Length(3)
        );
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("h{i}: v\r\n"))
            .collect();
        assert_eq!(
            bad(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Refusal::HeadTooLarge
        );
    }

    #[test]
    fn bodies_by_length_and_chunked_read_byte_by_byte() {
        let mut c = inbound(b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloPOST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0A\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n");
        let h = c.read_head(SECRET, None).unwrap();
        assert_eq!(c.read_body(h.framing, 100).unwrap(), b"hello");
        let h = c.read_head(SECRET, None).unwrap();
        assert_eq!(h.target, "/b");
        assert_eq!(c.read_body(h.framing, 100).unwrap(), b"abc0123456789");
        assert_eq!(c.read_head(SECRET, None), Err(Refusal::Gone));
    }

    #[test]
    fn body_limits_hold_for_both_framings() {
        let mut c = inbound(b"");
        assert_eq!(
            c.read_body(Framing::Length(11), 10),
            Err(Refusal::BodyTooLarge)
        );
        let mut c = inbound(b"6\r\nabcdef\r\n5\r\nghijk\r\n0\r\n\r\n");
        assert_eq!(
            c.read_body(Framing::Chunked, 10),
            Err(Refusal::BodyTooLarge)
        );
        let mut c = inbound(b"6\r\nabcdef\r\n4\r\nghij\r\n0\r\n\r\n");
        let body = c.read_body(Framing::Chunked, 10).unwrap();
        assert_eq!(body, b"abcdefghij");
        assert!(body.capacity() <= 10, "never more than the limit");
        for bad in [&b"zz\r\n"[..], b"3\r\nabcX\r\n", b"ffffffffffffffffff\r\n"] {
            let mut c = inbound(bad);
            assert!(
                matches!(
                    c.read_body(Framing::Chunked, 10),
                    Err(Refusal::Malformed(_))
                ),
                "{bad:?}"
            );
        }
        // A body cut short: nobody to answer.
        let mut c = inbound(b"abc");
        assert_eq!(c.read_body(Framing::Length(5), 10), Err(Refusal::Gone));
    }

    #[test]
    fn an_endless_head_is_cut_at_the_limit() {
        let endless = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_BYTES * 2));
        let mut c = inbound_by(endless.as_bytes(), 4096);
        assert_eq!(c.read_head(SECRET, None), Err(Refusal::HeadTooLarge));
    }

    #[test]
    fn target_path_and_query_secret() {
        assert_eq!(
            split_target("/hook/qrcode-updated?evoq_secret=a"),
            ("/hook/qrcode-updated", Some("evoq_secret=a"))
        );
        assert_eq!(split_target("/hook"), ("/hook", None));
        assert_eq!(
            split_target("http://Host:8787/hook/x?q=1"),
            ("/hook/x", Some("q=1"))
        );
        assert_eq!(split_target("HTTPS://host?q=1"), ("/", Some("q=1")));
        assert_eq!(split_target("/a#frag"), ("/a", None));

        assert_eq!(
            query_param("a=1&evoq_secret=ab%2Bc%20d+e&evoq_secret=2", "evoq_secret").as_deref(),
            Some("ab+c d+e")
        );
        assert_eq!(
            query_param("evoq%5Fsecret=x", "evoq_secret").as_deref(),
            Some("x")
        );
        assert_eq!(query_param("evoq_secret=&b=1", "evoq_secret"), None);
        assert_eq!(query_param("evoq_secret", "evoq_secret"), None);
        assert_eq!(query_param("other=1", "evoq_secret"), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
    }

    #[test]
    fn responses_are_complete_and_say_whether_they_close() {
        let r = Response {
            status: 503,
            body: r#"{"error":"busy"}"#.into(),
            keep_alive: true,
            idle_timeout: Duration::from_secs(5),
            head_only: false,
        };
        let text = String::from_utf8(r.to_bytes()).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 16\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nRetry-After: 1\r\n\r\n{\"error\":\"busy\"}"
        );
        let r = Response {
            status: 200,
            body: r#"{"status":"ok"}"#.into(),
            keep_alive: false,
            idle_timeout: Duration::from_secs(5),
            head_only: true,
        };
        let text = String::from_utf8(r.to_bytes()).unwrap();
        assert!(
            text.ends_with("Content-Length: 15\r\nConnection: close\r\n\r\n"),
            "{text}"
        );
    }
}
