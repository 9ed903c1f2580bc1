//! `/proc/PID/stat`: the numeric fields after the command name (which may hold spaces and
//! parentheses, so the text is split at its last `)`).

/// The fields of a `stat` text from field 3 on: field N (numbered as in proc(5)) is at index N - 3.
/// A field that is not a number (the state letter) reads as 0. `None` without a command name.
#[must_use]
pub fn fields(stat: &str) -> Option<Vec<u64>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(
        rest.split_ascii_whitespace()
            .map(|w| w.parse().unwrap_or(0))
            .collect(),
    )
}

/// The parent (field 4) and the start time (field 22, clock ticks after boot) of process `pid`:
/// together they tell a process apart from a later one that reuses its pid.
#[must_use]
pub fn parent_and_start(pid: u32) -> Option<(u32, u64)> {
    let f = fields(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    Some((u32::try_from(*f.get(1)?).ok()?, *f.get(19)?))
}

/// True while the process that `(pid, start time)` names runs (not a later one with its pid).
#[must_use]
pub fn still_runs((pid, start): (u32, u64)) -> bool {
    parent_and_start(pid).is_some_and(|(_, s)| s == start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_start_after_the_last_parenthesis() {
        let f = fields("42 (a (b) c) S 7 42 42 0 -1 4194560 100").unwrap();
        assert_eq!(f[..4], [0, 7, 42, 42]);
        assert!(fields("no name").is_none());
    }

    #[test]
    fn this_process_runs_and_its_parent_is_the_kernels_word() {
        let me = std::process::id();
        let (parent, start) = parent_and_start(me).unwrap();
        assert_eq!(parent, std::os::unix::process::parent_id());
        assert!(still_runs((me, start)));
        assert!(!still_runs((me, start + 1)));
    }
}
