//! Message boundaries in a byte stream that is forwarded as it arrives: the relay never
//! holds a message back to read it whole, so the tracker follows each direction piece by
//! piece, whatever the reads cut.

/// A message length below 4: the stream is not the protocol (the session ends).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a message {tag:?} of invalid length {len}")]
pub(crate) struct BadLength {
    /// The message's tag.
    pub(crate) tag: char,
    /// The length it gave.
    pub(crate) len: i32,
}

/// One step through a chunk of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece<'a> {
    /// The first byte of a message, its tag (the length may not have come yet).
    Tag(u8),
    /// Body bytes of the current message (all, or the part this chunk holds).
    Body(&'a [u8]),
    /// The current message is complete.
    End,
}

/// Where one direction of the stream stands.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Frames {
    /// The header of the current message (tag and length) as far as it has come.
    header: [u8; 5],
    header_len: usize,
    /// The header is complete: the body is being read.
    in_body: bool,
    /// Body bytes still to come.
    body_left: usize,
}

impl Frames {
    /// The next piece of `chunk`, consuming the bytes it covers; `None` once `chunk` is
    /// used up (a message may then be half through, to go on in the next chunk).
    ///
    /// # Errors
    /// [`BadLength`] for a length below 4.
    pub(crate) fn next<'a>(
        &mut self,
        chunk: &mut &'a [u8],
    ) -> Result<Option<Piece<'a>>, BadLength> {
        if self.in_body {
            if self.body_left == 0 {
                self.in_body = false;
                return Ok(Some(Piece::End));
            }
            if chunk.is_empty() {
                return Ok(None);
            }
            let (body, rest) = chunk.split_at(self.body_left.min(chunk.len()));
            self.body_left -= body.len();
            *chunk = rest;
            return Ok(Some(Piece::Body(body)));
        }
        let Some((&first, rest)) = chunk.split_first() else {
            return Ok(None);
        };
        if self.header_len == 0 {
            self.header[0] = first;
            self.header_len = 1;
            *chunk = rest;
            return Ok(Some(Piece::Tag(first)));
        }
        let n = (5 - self.header_len).min(chunk.len());
        self.header[self.header_len..self.header_len + n].copy_from_slice(&chunk[..n]);
        self.header_len += n;
        *chunk = &chunk[n..];
        if self.header_len < 5 {
            return Ok(None);
        }
        let [tag, a, b, c, d] = self.header;
        let len = i32::from_be_bytes([a, b, c, d]);
        if len < 4 {
            return Err(BadLength {
                tag: tag as char,
                len,
            });
        }
        self.header_len = 0;
        self.in_body = true;
        self.body_left = len as usize - 4;
        self.next(chunk)
    }

    /// The tag of the message being read (the last one, between messages).
    pub(crate) fn tag(&self) -> u8 {
        self.header[0]
    }

    /// Whether the stream stands between two messages.
    pub(crate) fn at_boundary(&self) -> bool {
        self.header_len == 0 && !self.in_body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// Every piece of `stream` fed in chunks of `split` bytes, bodies joined per message.
    fn pieces(stream: &[u8], split: usize) -> (Vec<(u8, Vec<u8>)>, bool) {
        let mut f = Frames::default();
        let mut got: Vec<(u8, Vec<u8>)> = Vec::new();
        let mut ended = 0;
        for mut chunk in stream.chunks(split) {
            while let Some(p) = f.next(&mut chunk).unwrap() {
                match p {
                    Piece::Tag(t) => got.push((t, Vec::new())),
                    Piece::Body(b) => got.last_mut().unwrap().1.extend_from_slice(b),
                    Piece::End => ended += 1,
                }
            }
        }
        assert_eq!(ended, got.len(), "every message ended");
        (got, f.at_boundary())
    }

    #[test]
    fn messages_are_followed_across_any_split() {
        let mut stream = msg(b'T', b"rowdesc");
        stream.extend(msg(b'D', &[7u8; 300]));
        stream.extend(msg(b'S', b""));
        stream.extend(msg(b'Z', b"T"));
        let want = vec![
            (b'T', b"rowdesc".to_vec()),
            (b'D', vec![7u8; 300]),
            (b'S', vec![]),
            (b'Z', b"T".to_vec()),
        ];
        for split in 1..=stream.len() {
            assert_eq!(
                pieces(&stream, split),
                (want.clone(), true),
                "split {split}"
            );
        }
    }

    #[test]
    fn a_half_message_is_not_a_boundary_and_a_bad_length_is_an_error() {
        let stream = msg(b'Q', b"SELECT 1\0");
        for cut in 1..stream.len() {
            let mut f = Frames::default();
            let mut chunk = &stream[..cut];
            while f.next(&mut chunk).unwrap().is_some() {}
            assert!(!f.at_boundary(), "cut at {cut}");
            assert_eq!(f.tag(), b'Q');
        }
        let mut f = Frames::default();
        let mut chunk: &[u8] = &[b'Q', 0, 0, 0, 3];
        assert_eq!(f.next(&mut chunk), Ok(Some(Piece::Tag(b'Q'))));
        assert_eq!(f.next(&mut chunk), Err(BadLength { tag: 'Q', len: 3 }));
    }
}
