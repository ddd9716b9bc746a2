//! The chunked transfer coding (RFC 9112 §7.1), decoded incrementally from
//! whatever slices the socket delivers. Lines (chunk sizes with their
//! extensions, trailer fields) are bounded, sizes are checked for overflow,
//! and every CRLF is required; chunk extensions and trailers are ignored.

/// Longest chunk-size line (size, extensions, CRLF) or trailer line.
pub(crate) const MAX_LINE: usize = 1024;
/// Most trailer bytes after the last chunk.
pub(crate) const MAX_TRAILER: usize = 16 * 1024;

/// Why a chunked body is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChunkError {
    /// A chunk-size or trailer line is longer than [`MAX_LINE`].
    #[error("a chunk-size or trailer line exceeds {MAX_LINE} bytes")]
    LineTooLong,
    /// A chunk-size line is not hex digits (with optional extensions).
    #[error("chunk-size line {0:?} is not a hex size")]
    BadSize(String),
    /// A chunk size does not fit in 64 bits.
    #[error("chunk size {0:?} is too large")]
    SizeOverflow(String),
    /// A line or chunk's data is not followed by CRLF.
    #[error("a chunk or line is not terminated by CRLF")]
    MissingCrlf,
    /// The trailer section is longer than [`MAX_TRAILER`].
    #[error("the trailer section exceeds {MAX_TRAILER} bytes")]
    TrailerTooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a chunk-size line.
    Size,
    /// Inside a chunk's data, with this many bytes to go.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty line.
    Trailer,
    Done,
}

/// An incremental decoder of one chunked body.
#[derive(Debug)]
pub(crate) struct Chunked {
    state: State,
    line: Vec<u8>,
    trailer: usize,
}

impl Chunked {
    pub(crate) fn new() -> Self {
        Self {
            state: State::Size,
            line: Vec::new(),
            trailer: 0,
        }
    }

    /// Whether the last chunk and the trailer section have been read.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from the start of `input`: returns how many bytes were
    /// consumed and the payload bytes found (a slice of `input`, possibly
    /// empty). Call again with the rest until it is empty or
    /// [`Chunked::is_done`]; each call consumes at least one byte of a
    /// non-empty input unless done. Bytes after the body are not consumed.
    pub(crate) fn decode<'a>(&mut self, input: &'a [u8]) -> Result<(usize, &'a [u8]), ChunkError> {
        let mut at = 0;
        loop {
            let rest = &input[at..];
            match self.state {
                State::Done => return Ok((at, &[])),
                _ if rest.is_empty() => return Ok((at, &[])),
                State::Data(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                    return Ok((at + n, &rest[..n]));
                }
                State::Size | State::DataEnd | State::Trailer => {
                    let limit = if self.state == State::DataEnd {
                        2
                    } else {
                        MAX_LINE
                    };
                    let (take, complete) = match rest.iter().position(|&b| b == b'\n') {
                        Some(i) => (i + 1, true),
                        None => (rest.len(), false),
                    };
                    if self.line.len() + take > limit {
                        return Err(if self.state == State::DataEnd {
                            ChunkError::MissingCrlf
                        } else {
                            ChunkError::LineTooLong
                        });
                    }
                    self.line.extend_from_slice(&rest[..take]);
                    at += take;
                    if complete {
                        let line = std::mem::take(&mut self.line);
                        self.end_line(&line)?;
                    }
                }
            }
        }
    }

    /// Acts on a complete line (ending in `\n`).
    fn end_line(&mut self, line: &[u8]) -> Result<(), ChunkError> {
        let text = line.strip_suffix(b"\r\n").ok_or(ChunkError::MissingCrlf)?;
        match self.state {
            State::DataEnd => {
                // `line` held at most 2 bytes and ended in CRLF.
                self.state = State::Size;
            }
            State::Size => {
                let bad = || ChunkError::BadSize(String::from_utf8_lossy(text).into_owned());
                let size_part = text.split(|&b| b == b';').next().unwrap_or(b"");
                let digits = size_part.trim_ascii_end();
                if digits.is_empty() || !digits.iter().all(u8::is_ascii_hexdigit) {
                    return Err(bad());
                }
                let significant = match digits.iter().position(|&b| b != b'0') {
                    Some(i) => &digits[i..],
                    None => b"0",
                };
                if significant.len() > 16 {
                    return Err(ChunkError::SizeOverflow(
                        String::from_utf8_lossy(digits).into_owned(),
                    ));
                }
                let hex = std::str::from_utf8(significant).map_err(|_| bad())?;
                let size = u64::from_str_radix(hex, 16).map_err(|_| bad())?;
                self.state = if size == 0 {
                    State::Trailer
                } else {
                    State::Data(size)
                };
            }
            State::Trailer => {
                if text.is_empty() {
                    self.state = State::Done;
                } else {
                    self.trailer += line.len();
                    if self.trailer > MAX_TRAILER {
                        return Err(ChunkError::TrailerTooLong);
                    }
                }
            }
            State::Data(_) | State::Done => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `wire` fed in pieces of `step` bytes; returns the payload and
    /// whether the body was complete.
    fn decode_in_steps(wire: &[u8], step: usize) -> Result<(Vec<u8>, bool), ChunkError> {
        let mut d = Chunked::new();
        let mut out = Vec::new();
        for piece in wire.chunks(step) {
            let mut input = piece;
            while !input.is_empty() && !d.is_done() {
                let (n, data) = d.decode(input)?;
                assert!(n > 0, "no progress");
                out.extend_from_slice(data);
                input = &input[n..];
            }
        }
        Ok((out, d.is_done()))
    }

    #[test]
    fn well_formed_bodies_decode_whatever_the_read_sizes() {
        let table: [(&[u8], &[u8]); 6] = [
            (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
            (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
            (
                b"00000000000000000000a\r\n0123456789\r\n000\r\n\r\n",
                b"0123456789",
            ),
            (
                b"3;name=value;x\r\nabc\r\n0;last\r\nX-Sum: 1\r\nX-B: 2\r\n\r\n",
                b"abc",
            ),
            (b"3 \t;ext\r\nabc\r\n0\r\n\r\n", b"abc"),
        ];
        for (wire, payload) in table {
            for step in [1, 2, 3, 7, wire.len()] {
                let (out, done) = decode_in_steps(wire, step).unwrap();
                assert_eq!(
                    (out.as_slice(), done),
                    (payload, true),
                    "{wire:?} in steps of {step}"
                );
            }
        }
    }

    #[test]
    fn bytes_after_the_body_are_left_alone() {
        let mut d = Chunked::new();
        let wire = b"2\r\nhi\r\n0\r\n\r\nGARBAGE";
        let (n1, data) = d.decode(wire).unwrap();
        assert_eq!(data, b"hi");
        let (n2, data) = d.decode(&wire[n1..]).unwrap();
        assert!(data.is_empty() && d.is_done());
        assert_eq!(&wire[n1 + n2..], b"GARBAGE");
    }

    #[test]
    fn a_truncated_body_is_not_done() {
        for wire in [
            &b"5\r\nhel"[..],
            b"5\r\nhello\r\n",
            b"5\r\nhello\r\n0\r\n",
            b"5\r\nhello",
        ] {
            let (_, done) = decode_in_steps(wire, 4).unwrap();
            assert!(!done, "{wire:?}");
        }
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let long_ext = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(MAX_LINE));
        let huge_trailer = format!(
            "0\r\n{}\r\n",
            "X-Pad: 0123456789012345678901234567890123456789\r\n".repeat(400)
        );
        let table: Vec<(Vec<u8>, ChunkError)> = vec![
            (b"zz\r\n".to_vec(), ChunkError::BadSize("zz".into())),
            (b"\r\n".to_vec(), ChunkError::BadSize(String::new())),
            (b"-5\r\n".to_vec(), ChunkError::BadSize("-5".into())),
            (b"+5\r\n".to_vec(), ChunkError::BadSize("+5".into())),
            (b"0x5\r\n".to_vec(), ChunkError::BadSize("0x5".into())),
            (b" 5\r\n".to_vec(), ChunkError::BadSize(" 5".into())),
            (b"5\nhello\r\n".to_vec(), ChunkError::MissingCrlf),
            (b"5\r\nhelloXY0\r\n\r\n".to_vec(), ChunkError::MissingCrlf),
            (b"5\r\nhello\n0\r\n\r\n".to_vec(), ChunkError::MissingCrlf),
            (b"0\r\nX: 1\n\r\n".to_vec(), ChunkError::MissingCrlf),
            (
                b"10000000000000000\r\n".to_vec(),
                ChunkError::SizeOverflow("10000000000000000".into()),
            ),
            (long_ext.into_bytes(), ChunkError::LineTooLong),
            (vec![b'1'; MAX_LINE + 1], ChunkError::LineTooLong),
            (huge_trailer.into_bytes(), ChunkError::TrailerTooLong),
        ];
        for (wire, want) in table {
            for step in [1, 5, wire.len()] {
                assert_eq!(
                    decode_in_steps(&wire, step),
                    Err(want.clone()),
                    "{:?} in steps of {step}",
                    String::from_utf8_lossy(&wire)
                );
            }
        }
    }

    #[test]
    fn the_largest_chunk_size_parses_without_overflow() {
        let mut d = Chunked::new();
        let (n, data) = d.decode(b"ffffffffffffffff\r\n").unwrap();
        assert_eq!(n, 18);
        assert!(data.is_empty());
        assert_eq!(d.state, State::Data(u64::MAX));
        let (_, data) = d.decode(b"ab").unwrap();
        assert_eq!(data, b"ab");
        assert_eq!(d.state, State::Data(u64::MAX - 2));
    }
}
