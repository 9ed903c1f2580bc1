//! The control socket's line protocol: one request line, one reply line.
//!
//! Replies start with `OK ` or `ERR `. Requests are at most [`MAX_REQUEST`] bytes; a longer or
//! non-UTF-8 request gets an `ERR` reply and the connection is closed.

use om::{Feature, Unavailable};

/// The longest request line accepted.
pub const MAX_REQUEST: usize = 4096;

/// The reply to one request line.
#[must_use]
pub fn answer(request: &str) -> String {
    let mut words = request.split_ascii_whitespace();
    match words.next() {
        Some("ping") => format!("OK omd {}", env!("CARGO_PKG_VERSION")),
        Some("ps") => format!("ERR {}", Unavailable::new(Feature::ProcessList)),
        Some("migrate") => format!("ERR {}", Unavailable::new(Feature::Migrate)),
        Some("checkpoint") => format!("ERR {}", Unavailable::new(Feature::Checkpoint)),
        Some("restart") => format!("ERR {}", Unavailable::new(Feature::Restart)),
        Some(other) => format!("ERR unknown request {:?}", truncate(other, 64)),
        None => "ERR empty request".to_owned(),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert!(answer("ping").starts_with("OK omd "));
        assert!(answer("ps").starts_with("ERR process list"));
        assert!(answer("  migrate 12 ").contains("issue #6"));
        assert_eq!(answer(""), "ERR empty request");
        let long = "x".repeat(1000);
        assert!(answer(&long).len() < 100);
    }
}
