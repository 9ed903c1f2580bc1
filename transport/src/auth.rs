//! Mutual authentication with the cluster key: an HMAC-SHA256 challenge-response over the handshake
//! transcript, and the per-connection keys that authenticate every later frame.
//!
//! Both sides contribute a fresh 32-byte nonce (`Hello`, `Welcome`); the transcript is the two bodies.
//! The client proves the key first and the server checks it before it accepts any other frame; then the
//! server proves the key and the client checks it before it sends any page, so neither an impostor
//! sender nor an impostor receiver gets anything. Frame keys are derived per direction from the key and
//! the transcript, so a frame cannot be reflected, replayed into another connection or reordered (the
//! sequence number is under the MAC).

use hmac::Mac;

use crate::conn::{Conn, HmacSha256, Keys, constant_time_eq};
use crate::error::TransportError;
use crate::key::ClusterKey;
use crate::wire::{ErrorCode, Hello, Kind};

const CLIENT_PROOF: &[u8] = b"om/1 client proof";
const SERVER_PROOF: &[u8] = b"om/1 server proof";
const CLIENT_TO_SERVER: &[u8] = b"om/1 frames client->server";
const SERVER_TO_CLIENT: &[u8] = b"om/1 frames server->client";

fn prf(key: &ClusterKey, label: &[u8], transcript: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length; ClusterKey is at least 16 bytes.
    let mut m = HmacSha256::new_from_slice(key.as_bytes()).unwrap_or_else(|_| unreachable!());
    m.update(label);
    m.update(transcript);
    m.finalize().into_bytes().into()
}

fn keyed(k: &[u8; 32]) -> HmacSha256 {
    HmacSha256::new_from_slice(k).unwrap_or_else(|_| unreachable!())
}

/// Fresh random bytes for a nonce or a session id.
///
/// # Panics
/// If the operating system has no random source (getrandom fails only on broken systems).
#[must_use]
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the OS random source failed");
    b
}

/// Runs the client side on a fresh connection. Returns the server's `Welcome`.
///
/// # Errors
/// The server's refusal, a server that cannot prove the key, or protocol and socket errors.
pub fn client(conn: &mut Conn, key: &ClusterKey, hello: &Hello) -> Result<Hello, TransportError> {
    let hello_body = hello.encode();
    conn.send(Kind::Hello, &hello_body)?;
    let welcome_body = conn.expect(Kind::Welcome, "in the handshake")?;
    let welcome = Hello::decode(&welcome_body).map_err(|e| conn.wire(e))?;
    let transcript = [hello_body, welcome_body].concat();
    conn.send(Kind::Proof, &prf(key, CLIENT_PROOF, &transcript))?;
    let proof = conn.expect(Kind::Proof, "in the handshake")?;
    if !constant_time_eq(&proof, &prf(key, SERVER_PROOF, &transcript)) {
        return Err(TransportError::PeerNotAuthenticated {
            peer: conn.peer().to_owned(),
        });
    }
    conn.set_keys(Keys {
        send: keyed(&prf(key, CLIENT_TO_SERVER, &transcript)),
        recv: keyed(&prf(key, SERVER_TO_CLIENT, &transcript)),
    });
    Ok(welcome)
}

/// What the server decided about a client's `Hello`.
pub type Decision = Result<Hello, (ErrorCode, String)>;

/// Runs the server side on an accepted connection. `decide` turns the client's `Hello` into the
/// `Welcome` (or a refusal); it runs before authentication, so it must not grant anything by itself.
/// Returns the client's `Hello` and the `Welcome` that was sent, once the client has proved the key.
/// The caller tells the client why when this fails ([`Conn::send_error`]).
///
/// # Errors
/// A refusal, a client without the key, protocol and socket errors.
pub fn server(
    conn: &mut Conn,
    key: &ClusterKey,
    decide: impl FnOnce(&Hello) -> Decision,
) -> Result<(Hello, Hello), TransportError> {
    let hello_body = conn.expect(Kind::Hello, "in the handshake")?;
    let hello = Hello::decode(&hello_body).map_err(|e| conn.wire(e))?;
    let welcome = decide(&hello).map_err(|(code, reason)| TransportError::Refused {
        peer: conn.peer().to_owned(),
        code,
        reason,
    })?;
    let welcome_body = welcome.encode();
    conn.send(Kind::Welcome, &welcome_body)?;
    let transcript = [hello_body, welcome_body].concat();
    let proof = conn.expect(Kind::Proof, "in the handshake")?;
    if !constant_time_eq(&proof, &prf(key, CLIENT_PROOF, &transcript)) {
        return Err(TransportError::PeerNotAuthenticated {
            peer: conn.peer().to_owned(),
        });
    }
    conn.send(Kind::Proof, &prf(key, SERVER_PROOF, &transcript))?;
    conn.set_keys(Keys {
        send: keyed(&prf(key, SERVER_TO_CLIENT, &transcript)),
        recv: keyed(&prf(key, CLIENT_TO_SERVER, &transcript)),
    });
    Ok((hello, welcome))
}
