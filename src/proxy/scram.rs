//! The server side of SCRAM-SHA-256 (RFC 5802/7677), as PostgreSQL speaks it: how TCP
//! clients prove they hold the proxy's local secret. The secret is salted and stretched
//! once at start; a login costs a few HMACs, and the secret is never sent or logged.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// PostgreSQL's default iteration count.
const ITERATIONS: u32 = 4096;

/// The stored form of the local secret: no password, only its keys.
pub(crate) struct Verifier {
    salt: [u8; 16],
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("scram::Verifier([redacted])")
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any size");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA-256 with one block: SCRAM's `Hi()`.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut prev = hmac(password, &[salt, &[0, 0, 0, 1]]);
    let mut out = prev;
    for _ in 1..iterations {
        prev = hmac(password, &[&prev]);
        for (o, p) in out.iter_mut().zip(prev) {
            *o ^= p;
        }
    }
    out
}

impl Verifier {
    /// Salt and stretch `password` (done once).
    pub(crate) fn new(password: &[u8]) -> Self {
        let mut salt = [0u8; 16];
        super::random_bytes(&mut salt);
        let salted = hi(password, &salt, ITERATIONS);
        let client_key = hmac(&salted, &[b"Client Key"]);
        Self {
            salt,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }

    /// Start an exchange from the client's first message (`n,,n=user,r=nonce`); returns
    /// the server's first message and the state for the final one.
    pub(crate) fn first(&self, client_first: &[u8]) -> Result<(String, Exchange), &'static str> {
        let text = std::str::from_utf8(client_first).map_err(|_| "not UTF-8")?;
        // gs2 header: `n,,` (no channel binding) or `y,,` (the client could, the server
        // offers none); `p=` asks for binding the proxy does not offer.
        let (gs2, bare) = if let Some(b) = text.strip_prefix("n,,") {
            ("n,,", b)
        } else if let Some(b) = text.strip_prefix("y,,") {
            ("y,,", b)
        } else {
            return Err("unsupported channel binding (the proxy offers SCRAM-SHA-256 only)");
        };
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic() && b != b','))
            .ok_or("no client nonce")?;
        let mut server_nonce = [0u8; 18];
        super::random_bytes(&mut server_nonce);
        let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
        let server_first = format!("r={nonce},s={},i={ITERATIONS}", B64.encode(self.salt));
        Ok((
            server_first.clone(),
            Exchange {
                gs2: gs2.to_owned(),
                client_first_bare: bare.to_owned(),
                server_first,
                nonce,
            },
        ))
    }

    /// Check the client's final message; returns the server's final message
    /// (`v=signature`) if the proof holds.
    pub(crate) fn finish(
        &self,
        ex: &Exchange,
        client_final: &[u8],
    ) -> Result<String, &'static str> {
        let text = std::str::from_utf8(client_final).map_err(|_| "not UTF-8")?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or("no proof")?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        if channel != Some(B64.encode(ex.gs2.as_bytes()).as_str()) {
            return Err("channel binding does not match");
        }
        if nonce != Some(ex.nonce.as_str()) {
            return Err("nonce does not match");
        }
        let proof = B64.decode(proof).map_err(|_| "proof is not base64")?;
        if proof.len() != 32 {
            return Err("proof has the wrong length");
        }
        let auth_message = format!(
            "{},{},{without_proof}",
            ex.client_first_bare, ex.server_first
        );
        let signature = hmac(&self.stored_key, &[auth_message.as_bytes()]);
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key.iter_mut().zip(proof.iter().zip(signature)) {
            *k = p ^ s;
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        // Constant time: compare all bytes.
        if stored
            .iter()
            .zip(self.stored_key)
            .fold(0u8, |d, (a, b)| d | (a ^ b))
            != 0
        {
            return Err("wrong password");
        }
        let server_signature = hmac(&self.server_key, &[auth_message.as_bytes()]);
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// One exchange in progress.
pub(crate) struct Exchange {
    gs2: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// The client of tokio-postgres (what psql and libpq do alike) against this server.
    fn login(server: &Verifier, password: &[u8]) -> Result<(), String> {
        let mut client = ScramSha256::new(password, ChannelBinding::unsupported());
        let (first, ex) = server.first(client.message())?;
        client.update(first.as_bytes()).map_err(|e| e.to_string())?;
        let fin = server.finish(&ex, client.message())?;
        client.finish(fin.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn the_right_password_passes_and_a_wrong_one_does_not() {
        let server = Verifier::new(b"local secret");
        login(&server, b"local secret").unwrap();
        assert_eq!(
            login(&server, b"local secreT").unwrap_err(),
            "wrong password"
        );
        assert!(!format!("{server:?}").contains("secret"));
    }

    #[test]
    fn malformed_messages_are_refused() {
        let server = Verifier::new(b"pw");
        for bad in [
            &b"p=tls-server-end-point,,n=,r=abc"[..],
            b"n,,n=,r=",
            b"x",
            b"\xff",
        ] {
            assert!(server.first(bad).is_err(), "{bad:?}");
        }
        let (_, ex) = server.first(b"n,,n=,r=abc").unwrap();
        for bad in [
            &b"c=biws,r=abc,p=AAAA"[..],
            b"c=biws,r=other,p=AAAA",
            b"no proof",
            b"c=eSws,r=x,p=",
        ] {
            assert!(server.finish(&ex, bad).is_err(), "{bad:?}");
        }
    }
}
