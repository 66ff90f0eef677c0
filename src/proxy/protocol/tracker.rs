//! One session's protocol state, from the bytes going both ways: the relay forwards them
//! untouched and feeds them here; the hand-over and the end of the session ask
//! [`Tracker::is_idle`] and [`Tracker::can_move`]. No I/O: table-tested
//! (`protocol/tests.rs`) and fuzzed (`fuzz/fuzz_targets/proxy_protocol.rs`).
//!
//! The server answers the client's messages in order. The tracker keeps the messages it
//! has not finished answering (`waiting`) and takes each reply off the front:
//! ParseComplete ends a Parse, BindComplete a Bind, CloseComplete a Close, RowDescription
//! or NoData a Describe, CommandComplete, EmptyQueryResponse or PortalSuspended an
//! Execute, ReadyForQuery everything up to a Sync, a simple Query or a FunctionCall. An
//! ErrorResponse to an extended-protocol message makes the server skip what follows until
//! the next Sync (a Query among them too: it gets no answer). During COPY FROM STDIN the
//! server ignores Sync and Flush, and CopyDone or CopyFail ends the copy.
//!
//! Clients send CopyData only once they have seen CopyInResponse (the protocol asks it,
//! and libpq, JDBC, tokio-postgres and psycopg do so): the Syncs a client sent before it
//! saw CopyInResponse are the ones the server ignores.

use std::collections::VecDeque;
use std::fmt;

use super::frames::{BadLength, Frames, Piece};
use super::scan::Scanner;

/// The largest unnamed Parse kept for a hand-over (each, and once parsed).
pub(crate) const MAX_UNNAMED_PARSE: usize = 64 * 1024;
/// The most bytes of unnamed Parses kept while they are in flight together (a driver's
/// batch: several unnamed Parses before one Sync).
pub(crate) const MAX_UNNAMED_IN_FLIGHT: usize = 1024 * 1024;

/// What the session did that no hand-over can read back from the server: it is never
/// moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opaque {
    /// `SET` of a custom setting (`app.tenant_id`), which `pg_settings` does not list.
    CustomSetting,
    /// A call of `set_config(...)`, which may set one.
    SetConfig,
    /// `LISTEN`: notifications could arrive while a hand-over reads the state.
    Listen,
    /// A FunctionCall message (a function called by its OID): it may set anything.
    FunctionCall,
    /// A custom setting in the startup packet (`options=-c app.x=1`).
    StartupSetting,
}

impl fmt::Display for Opaque {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::CustomSetting => {
                "it set a custom setting (SET x.y), which no hand-over can read back"
            }
            Self::SetConfig => {
                "it called set_config(), which may set a custom setting no hand-over can read back"
            }
            Self::Listen => "it ran LISTEN",
            Self::FunctionCall => {
                "it called a function by OID (FunctionCall), which may set anything"
            }
            Self::StartupSetting => {
                "its startup packet set a custom setting, which no hand-over can read back"
            }
        })
    }
}

/// Why a session cannot move to another server connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// A message is half through, one way or the other.
    MidMessage,
    /// In COPY FROM STDIN.
    CopyIn,
    /// In COPY TO STDOUT.
    CopyOut,
    /// This many simple Queries, Syncs or FunctionCalls wait for their ReadyForQuery.
    Replies(usize),
    /// Extended-protocol messages the client has not closed with a Sync yet (the server
    /// holds an implicit transaction, or skips after an error until the Sync).
    Unsynced,
    /// Inside a transaction block.
    InTransaction,
    /// Inside a failed transaction block (until ROLLBACK).
    FailedTransaction,
    /// What the session did that no hand-over can carry.
    Opaque(Opaque),
    /// The client may bind an unnamed statement whose Parse was too large to keep.
    UnnamedStatement,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MidMessage => f.write_str("a message is half through"),
            Self::CopyIn => f.write_str("it is in COPY FROM STDIN"),
            Self::CopyOut => f.write_str("it is in COPY TO STDOUT"),
            Self::Replies(1) => f.write_str("a query waits for its reply"),
            Self::Replies(n) => write!(f, "{n} queries wait for their replies"),
            Self::Unsynced => f.write_str("extended-protocol messages wait for their Sync"),
            Self::InTransaction => f.write_str("it is in a transaction"),
            Self::FailedTransaction => {
                f.write_str("it is in a failed transaction (until its ROLLBACK)")
            }
            Self::Opaque(o) => o.fmt(f),
            Self::UnnamedStatement => write!(
                f,
                "its unnamed statement was not kept (a Parse over {} KiB, or over {} KiB of \
                 unnamed Parses in flight together)",
                MAX_UNNAMED_PARSE / 1024,
                MAX_UNNAMED_IN_FLIGHT / 1024
            ),
        }
    }
}

/// What to forward of a chunk from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Forward {
    /// All of it.
    All,
    /// The bytes before this offset: a Terminate starts there (it is not forwarded; the
    /// server connection stays open for the next session).
    Until(usize),
}

/// The unnamed statement on the server, for a hand-over to parse again.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Unnamed {
    /// Its Parse body as the client sent it.
    Kept(Vec<u8>),
    /// Its Parse was too large to keep.
    NotKept,
}

/// A client message the server has yet to answer in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Query,
    FunctionCall,
    Sync,
    /// Its body, if it is of the unnamed statement, is in `Tracker::unnamed_in_flight`.
    Parse {
        unnamed: bool,
    },
    Bind,
    Describe,
    Execute,
    Close {
        unnamed_statement: bool,
    },
    /// CopyDone or CopyFail sent before the server's CopyInResponse came: it ends that
    /// copy (or, if none starts, the server ignores it).
    CopyEnd,
}

impl Sent {
    /// Answered by a ReadyForQuery.
    fn ends_with_ready(self) -> bool {
        matches!(self, Self::Query | Self::FunctionCall | Self::Sync)
    }
}

/// How the server dealt with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    Failed,
    /// Skipped after an earlier error, until a Sync.
    Skipped,
}

/// One session's protocol state (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tracker {
    client: Frames,
    server: Frames,
    /// The first two body bytes of the client message being read (a Parse's or Close's
    /// name, a Close's kind).
    head: [u8; 2],
    head_len: usize,
    /// The body of an unnamed Parse being read: `Some` while it is kept.
    parse_body: Option<Vec<u8>>,
    /// The Parse being read names the unnamed statement but is too large to keep.
    parse_too_large: bool,
    /// The status byte of the ReadyForQuery being read.
    ready_status: Option<u8>,
    /// Client messages not yet answered in full, oldest first.
    waiting: VecDeque<Sent>,
    /// How many of them a ReadyForQuery answers (Syncs, Queries, FunctionCalls).
    owed: usize,
    /// Bodies of the unnamed Parses in `waiting`, in order (`None`: not kept).
    unnamed_in_flight: VecDeque<Option<Vec<u8>>>,
    /// Bytes kept in `unnamed_in_flight`.
    kept_in_flight: usize,
    /// Extended-protocol messages sent since the last Sync the server will answer.
    unsynced: bool,
    /// The server skips the client's messages until its next Sync.
    skipping: bool,
    copy_in: bool,
    copy_out: bool,
    /// From the last ReadyForQuery: `I` idle, `T` in a transaction, `E` in a failed one.
    status: u8,
    /// The unnamed statement the server holds, if any.
    unnamed: Option<Unnamed>,
    /// Set once, for the session's life.
    opaque: Option<Opaque>,
    scanner: Scanner,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

impl Tracker {
    /// A session that has just started (idle, after the proxy's ReadyForQuery).
    pub(crate) fn new() -> Self {
        Self {
            client: Frames::default(),
            server: Frames::default(),
            head: [0; 2],
            head_len: 0,
            parse_body: None,
            parse_too_large: false,
            ready_status: None,
            waiting: VecDeque::new(),
            owed: 0,
            unnamed_in_flight: VecDeque::new(),
            kept_in_flight: 0,
            unsynced: false,
            skipping: false,
            copy_in: false,
            copy_out: false,
            status: b'I',
            unnamed: None,
            opaque: None,
            scanner: Scanner::default(),
        }
    }

    /// The session did what no hand-over can carry (known outside the messages: its
    /// startup packet).
    pub(crate) fn mark_opaque(&mut self, what: Opaque) {
        self.opaque.get_or_insert(what);
    }

    /// Bytes from the client, in order, however the reads cut them.
    ///
    /// # Errors
    /// [`BadLength`]: not the protocol.
    pub(crate) fn client_sent(&mut self, mut chunk: &[u8]) -> Result<Forward, BadLength> {
        let len = chunk.len();
        loop {
            if self.client.at_boundary() && chunk.first() == Some(&b'X') {
                return Ok(Forward::Until(len - chunk.len()));
            }
            let Some(piece) = self.client.next(&mut chunk)? else {
                return Ok(Forward::All);
            };
            match piece {
                Piece::Tag(_) => {
                    self.head_len = 0;
                    self.parse_body = None;
                    self.parse_too_large = false;
                    self.scanner.reset();
                }
                Piece::Body(body) => self.client_body(body),
                Piece::End => self.client_message(self.client.tag()),
            }
        }
    }

    /// Bytes from the server, in order, however the reads cut them.
    ///
    /// # Errors
    /// [`BadLength`]: not the protocol.
    pub(crate) fn server_sent(&mut self, mut chunk: &[u8]) -> Result<(), BadLength> {
        while let Some(piece) = self.server.next(&mut chunk)? {
            match piece {
                Piece::Tag(_) => self.ready_status = None,
                Piece::Body(body) => {
                    if self.server.tag() == b'Z' && self.ready_status.is_none() {
                        self.ready_status = body.first().copied();
                    }
                }
                Piece::End => self.server_message(self.server.tag()),
            }
        }
        // A client that pipelined a great deal once does not keep that memory for the
        // rest of its session.
        if self.waiting.is_empty() && self.waiting.capacity() > 1024 {
            self.waiting.shrink_to(64);
        }
        if self.unnamed_in_flight.is_empty() && self.unnamed_in_flight.capacity() > 1024 {
            self.unnamed_in_flight.shrink_to(64);
        }
        Ok(())
    }

    /// Between transactions: every message through both ways, every query answered,
    /// nothing waiting for a Sync, no COPY, outside a transaction block. The server
    /// connection could then be reset and given to another session.
    pub(crate) fn is_idle(&self) -> bool {
        self.busy().is_none()
    }

    /// Whether the session could move to another server connection now: idle, and
    /// nothing done that a hand-over cannot carry.
    ///
    /// # Errors
    /// What keeps it where it is.
    pub(crate) fn can_move(&self) -> Result<(), Why> {
        if let Some(why) = self.busy() {
            return Err(why);
        }
        if let Some(what) = self.opaque {
            return Err(Why::Opaque(what));
        }
        if self.unnamed == Some(Unnamed::NotKept) {
            return Err(Why::UnnamedStatement);
        }
        Ok(())
    }

    /// The body of the Parse that made the server's unnamed statement, if there is one:
    /// parsed again where the session goes, and where it stays after the proxy's own
    /// queries (a simple query ends the unnamed statement).
    pub(crate) fn unnamed_statement(&self) -> Option<&[u8]> {
        match &self.unnamed {
            Some(Unnamed::Kept(body)) => Some(body),
            _ => None,
        }
    }

    /// What the fields must agree on (checked by the tests and the fuzz target).
    #[cfg(any(test, fuzzing))]
    pub(crate) fn check(&self) {
        let owed = self.waiting.iter().filter(|s| s.ends_with_ready()).count();
        assert_eq!(self.owed, owed, "ReadyForQuery owed");
        let unnamed = self
            .waiting
            .iter()
            .filter(|s| **s == Sent::Parse { unnamed: true })
            .count();
        assert_eq!(
            self.unnamed_in_flight.len(),
            unnamed,
            "unnamed Parses in flight"
        );
        let kept: usize = self.unnamed_in_flight.iter().flatten().map(Vec::len).sum();
        assert_eq!(self.kept_in_flight, kept, "bytes kept in flight");
        assert!(kept <= MAX_UNNAMED_IN_FLIGHT);
        assert_ne!(
            self.waiting.front(),
            Some(&Sent::CopyEnd),
            "a CopyEnd with no copy"
        );
    }

    fn busy(&self) -> Option<Why> {
        if !self.client.at_boundary() || !self.server.at_boundary() {
            return Some(Why::MidMessage);
        }
        if self.copy_in {
            return Some(Why::CopyIn);
        }
        if self.copy_out {
            return Some(Why::CopyOut);
        }
        match self.owed {
            0 if self.unsynced || self.skipping || !self.waiting.is_empty() => Some(Why::Unsynced),
            0 => match self.status {
                b'I' => None,
                b'E' => Some(Why::FailedTransaction),
                _ => Some(Why::InTransaction),
            },
            n => Some(Why::Replies(n)),
        }
    }

    fn client_body(&mut self, body: &[u8]) {
        let tag = self.client.tag();
        let n = (2 - self.head_len).min(body.len());
        if tag == b'P' && self.head_len == 0 && body.first() == Some(&0) {
            self.parse_body = Some(Vec::new());
        }
        self.head[self.head_len..self.head_len + n].copy_from_slice(&body[..n]);
        self.head_len += n;
        if let Some(kept) = &mut self.parse_body {
            if kept.len() + body.len() <= MAX_UNNAMED_PARSE
                && self.kept_in_flight + kept.len() + body.len() <= MAX_UNNAMED_IN_FLIGHT
            {
                kept.extend_from_slice(body);
            } else {
                self.parse_body = None;
                self.parse_too_large = true;
            }
        }
        if matches!(tag, b'Q' | b'P') && self.opaque.is_none() {
            self.scanner.feed(body);
        }
    }

    /// A complete message from the client.
    fn client_message(&mut self, tag: u8) {
        if matches!(tag, b'Q' | b'P') && self.opaque.is_none() {
            self.opaque = self.scanner.finish();
        }
        if tag == b'F' {
            self.mark_opaque(Opaque::FunctionCall);
        }
        // CopyDone, CopyFail: the copy is over; sent before its CopyInResponse came, it
        // waits for it; otherwise the server ignores it.
        if matches!(tag, b'c' | b'f') {
            if self.copy_in {
                self.copy_in = false;
            } else if !self.waiting.is_empty() && !self.skipping {
                self.waiting.push_back(Sent::CopyEnd);
            }
            return;
        }
        // During COPY FROM STDIN the server ignores Sync and Flush.
        if self.copy_in && matches!(tag, b'S' | b'H') {
            return;
        }
        if matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C' | b'H') {
            self.unsynced = true;
        }
        if self.skipping && tag != b'S' {
            return; // the server skips it
        }
        let sent = match tag {
            b'S' => {
                self.unsynced = false;
                self.skipping = false;
                Sent::Sync
            }
            b'Q' => Sent::Query,
            b'F' => Sent::FunctionCall,
            b'P' => {
                let unnamed = self.parse_body.is_some() || self.parse_too_large;
                if unnamed {
                    let body = self.parse_body.take();
                    self.kept_in_flight += body.as_ref().map_or(0, Vec::len);
                    self.unnamed_in_flight.push_back(body);
                }
                Sent::Parse { unnamed }
            }
            b'B' => Sent::Bind,
            b'D' => Sent::Describe,
            b'E' => Sent::Execute,
            b'C' => Sent::Close {
                unnamed_statement: self.head[..self.head_len] == [b'S', 0],
            },
            // Flush (no reply), CopyData outside a copy (ignored), anything else (the
            // server ends the session).
            _ => return,
        };
        self.owed += usize::from(sent.ends_with_ready());
        self.waiting.push_back(sent);
    }

    /// A complete message from the server.
    fn server_message(&mut self, tag: u8) {
        match tag {
            b'Z' => {
                self.status = self.ready_status.unwrap_or(b'?');
                self.copy_in = false;
                self.copy_out = false;
                self.skipping = false;
                // Everything up to the oldest Sync, Query or FunctionCall is answered
                // (a reply for each came before, unless the stream is not what the
                // tracker expects: then what became of them is unknown).
                if let Some(at) = self.waiting.iter().position(|s| s.ends_with_ready()) {
                    for _ in 0..at {
                        self.settle_front(None);
                    }
                    self.settle_front(Some(Outcome::Done));
                }
            }
            b'1' => self.settle_if(|s| matches!(s, Sent::Parse { .. })),
            b'2' => self.settle_if(|s| s == Sent::Bind),
            b'3' => self.settle_if(|s| matches!(s, Sent::Close { .. })),
            b'T' | b'n' => self.settle_if(|s| s == Sent::Describe),
            b'C' | b'I' | b's' => {
                if tag == b'C' {
                    self.copy_out = false;
                }
                self.settle_if(|s| s == Sent::Execute);
            }
            b'E' => self.error(),
            b'G' | b'W' => self.copy_starts(),
            b'H' => self.copy_out = true,
            b'c' => self.copy_out = false,
            // Rows, notices, notifications, parameter changes, ...: nothing to settle.
            _ => {}
        }
        while self.waiting.front() == Some(&Sent::CopyEnd) {
            self.waiting.pop_front(); // no copy to end: the server ignores it
        }
    }

    /// An ErrorResponse.
    fn error(&mut self) {
        self.copy_in = false;
        self.copy_out = false;
        match self.waiting.front() {
            // A simple Query or FunctionCall fails whole: its ReadyForQuery follows. So
            // does a Sync's (a failed commit). None: the server is ending the session.
            None | Some(Sent::Query | Sent::FunctionCall | Sent::Sync) => {}
            Some(_) => {
                self.settle_front(Some(Outcome::Failed));
                while self.waiting.front().is_some_and(|s| *s != Sent::Sync) {
                    self.settle_front(Some(Outcome::Skipped));
                }
                self.skipping = self.waiting.is_empty();
            }
        }
    }

    /// CopyInResponse (or CopyBothResponse) for the Execute or Query at the front.
    fn copy_starts(&mut self) {
        self.copy_in = true;
        let extended = self.waiting.front() == Some(&Sent::Execute);
        // What the client sent before it saw this reaches the server as part of the
        // copy: a Sync is ignored, a CopyDone or CopyFail ends it.
        while let Some(&next) = self.waiting.get(1) {
            match next {
                Sent::Sync => {
                    self.waiting.remove(1);
                    self.owed -= 1;
                }
                Sent::CopyEnd => {
                    self.waiting.remove(1);
                    self.copy_in = false;
                    break;
                }
                _ => break,
            }
        }
        // The Execute's Sync went into the copy: the client owes another.
        if extended && !self.waiting.contains(&Sent::Sync) {
            self.unsynced = true;
        }
    }

    /// Take the front message off when `is` says the reply is its own.
    fn settle_if(&mut self, is: impl Fn(Sent) -> bool) {
        if self.waiting.front().is_some_and(|&s| is(s)) {
            self.settle_front(Some(Outcome::Done));
        }
    }

    /// Take the front message off, with what became of it (`None`: unknown).
    fn settle_front(&mut self, outcome: Option<Outcome>) {
        let Some(sent) = self.waiting.pop_front() else {
            return;
        };
        self.owed -= usize::from(sent.ends_with_ready());
        match (sent, outcome) {
            (Sent::Parse { unnamed: true }, outcome) => {
                let body = self.unnamed_in_flight.pop_front().flatten();
                self.kept_in_flight -= body.as_ref().map_or(0, Vec::len);
                match outcome {
                    // The server holds this statement now.
                    Some(Outcome::Done) => {
                        self.unnamed = Some(body.map_or(Unnamed::NotKept, Unnamed::Kept));
                    }
                    // The old one was dropped before the new one failed.
                    Some(Outcome::Failed) => self.unnamed = None,
                    Some(Outcome::Skipped) => {}
                    None => self.unnamed = Some(Unnamed::NotKept),
                }
            }
            // A simple query ends the unnamed statement; so does its Close.
            (Sent::Query, Some(Outcome::Done | Outcome::Failed))
            | (
                Sent::Close {
                    unnamed_statement: true,
                },
                Some(Outcome::Done),
            ) => self.unnamed = None,
            _ => {}
        }
    }
}
