//! The PostgreSQL protocol as far as the proxy reads and writes it. The session tracker
//! and what it stands on (`tracker.rs`, `frames.rs`, `scan.rs`) are pure: bytes in,
//! answers out, no I/O.
//!
//! - `startup.rs`: the packets a client opens with, and the settings it asks for.
//! - `messages.rs`: the messages the proxy writes itself (and reads during login).
//! - `frames.rs`: message boundaries in a stream forwarded as it arrives.
//! - `scan.rs`: query text looked at for what no hand-over can carry.
//! - `tracker.rs`: one session's state both ways: is it idle, can it move, and why not.

pub(crate) mod frames;
pub(crate) mod messages;
pub(crate) mod scan;
pub(crate) mod startup;
pub(crate) mod tracker;

#[cfg(test)]
mod tests;

pub(crate) use tracker::{Forward, Opaque, Tracker};

/// The tracker over arbitrary bytes, for the fuzz target `proxy_protocol`: the input is
/// a sequence of pieces, each a byte (its lowest bit the direction: 0 client → server,
/// 1 server → client; the rest its length) and that many bytes. Fed whole and byte by
/// byte, the tracker must end in the same state after every piece, never panic, and
/// never say a session can move when it is not idle.
#[cfg(fuzzing)]
pub(crate) fn fuzz_tracker(mut data: &[u8]) {
    let mut whole = Tracker::new();
    let mut bytewise = Tracker::new();
    let mut client_done = false;
    while let Some((&head, rest)) = data.split_first() {
        let (chunk, rest) = rest.split_at((usize::from(head) >> 1).min(rest.len()));
        data = rest;
        let to_server = head & 1 == 0;
        if to_server && client_done {
            continue;
        }
        let (a, b) = if to_server {
            let a = whole.client_sent(chunk);
            let mut b = Ok(Forward::All);
            for (i, byte) in chunk.iter().enumerate() {
                match bytewise.client_sent(std::slice::from_ref(byte)) {
                    Ok(Forward::Until(0)) => {
                        b = Ok(Forward::Until(i));
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        b = Err(e);
                        break;
                    }
                }
            }
            client_done = matches!(a, Ok(Forward::Until(_)));
            (a, b)
        } else {
            let a = whole.server_sent(chunk).map(|()| Forward::All);
            let b = chunk
                .iter()
                .try_for_each(|byte| bytewise.server_sent(std::slice::from_ref(byte)))
                .map(|()| Forward::All);
            (a, b)
        };
        assert_eq!(a, b, "fed whole and byte by byte");
        if a.is_err() {
            return;
        }
        assert_eq!(whole, bytewise, "fed whole and byte by byte");
        whole.check();
        assert!(whole.can_move().is_err() || whole.is_idle());
        if let Err(why) = whole.can_move() {
            assert!(why.to_string().len() < 200);
        }
    }
}
