//! A migration's report, read from the runtime's JSON (`omctl migrate --json` prints the same).

/// What a migration did.
#[derive(Debug, Clone, PartialEq)]
#[repr(C)]
pub struct Migration {
    /// Threads stopped on the source until the copy ran on the destination, in ms.
    pub freeze_ms: f64,
    /// From the request to the copy running, in ms.
    pub total_ms: f64,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// The copy's pid on the destination node (0 when only the process's home confirmed that the
    /// copy runs: the destination's answer was lost).
    pub pid_there: u32,
    /// Bytes of pages sent.
    pub bytes_sent: u64,
    /// Bytes of the final round (sent while the process was stopped).
    pub final_bytes: u64,
}

/// The text after `"key":` in a flat JSON object, up to the next `,` or `}` (or the end).
#[must_use]
pub fn field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &json[at..];
    Some(rest[..rest.find([',', '}']).unwrap_or(rest.len())].trim())
}

/// The string after `"key":` in a flat JSON object.
#[must_use]
pub fn text<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let at = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let rest = &json[at..];
    Some(&rest[..rest.find('"')?])
}

impl Migration {
    /// Reads the runtime's report; `None` when a field is missing.
    #[must_use]
    pub fn from_json(json: &str) -> Option<Self> {
        Some(Self {
            freeze_ms: field(json, "freeze_ms")?.parse().ok()?,
            total_ms: field(json, "total_ms")?.parse().ok()?,
            rounds: field(json, "rounds")?.parse().ok()?,
            pid_there: field(json, "pid_there")?.parse().ok()?,
            bytes_sent: field(json, "bytes_sent")?.parse().ok()?,
            final_bytes: field(json, "final_bytes")?.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_report() {
        let j = r#"{"freeze_ms":12.500,"total_ms":900.000,"rounds":2,"bytes_sent":2097152,"final_bytes":4096,"stop":"WithinBudget","tracker":"uffd","pid_there":42,"round_detail":[]}"#;
        let m = Migration::from_json(j).unwrap();
        assert_eq!(
            (m.rounds, m.pid_there, m.bytes_sent, m.final_bytes),
            (2, 42, 2_097_152, 4096)
        );
        assert!((m.freeze_ms - 12.5).abs() < 1e-9);
        assert_eq!(text(j, "tracker"), Some("uffd"));
        assert_eq!(Migration::from_json("{}"), None);
    }
}
