//! omctl's human report of a migration, read from the runtime's JSON report.

use om_launch::report::text;

/// The number after `"key":` in a flat JSON object.
fn num(obj: &str, key: &str) -> Option<f64> {
    om_launch::report::field(obj, key)?.parse().ok()
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / f64::from(1u32 << 20))
}

/// The report for people: bytes and dirty rate per round, freeze and total time.
#[must_use]
pub fn human(pid: u32, to: &str, json: &str) -> String {
    let mut out = String::new();
    if let Some(detail) = json.split("\"round_detail\":[").nth(1) {
        for (i, r) in detail.split("},{").enumerate() {
            if let (Some(b), Some(ms), Some(rate)) = (num(r, "bytes"), num(r, "ms"), num(r, "dirty_rate")) {
                let throttle = match num(r, "throttle") {
                    Some(t) if t > 0.0 => format!(", throttled {:.0} %", t * 100.0),
                    _ => String::new(),
                };
                let lanes = match num(r, "lanes") {
                    Some(n) if n > 1.0 => format!(" over {n:.0} connections"),
                    _ => String::new(),
                };
                out.push_str(&format!(
                    "round {i}: {} in {ms:.1} ms{lanes}, dirty rate {}/s{throttle}\n",
                    mib(b),
                    mib(rate)
                ));
            }
        }
    }
    out.push_str(&format!(
        "final round: {} while stopped ({})\n",
        mib(num(json, "final_bytes").unwrap_or(0.0)),
        text(json, "stop").unwrap_or("?")
    ));
    let steps: Vec<String> = [
        ("park", "threads parked"),
        ("collect", "collect"),
        ("snapshot", "snapshot"),
        ("pages", "pages"),
        ("records", "records"),
        ("restore", "restore there"),
        ("go", "go"),
    ]
    .iter()
    .filter_map(|(key, name)| num(json, &format!("{key}_ms")).map(|ms| format!("{name} {ms:.1}")))
    .collect();
    if !steps.is_empty() {
        out.push_str(&format!("freeze (ms): {}\n", steps.join(", ")));
    }
    out.push_str(&format!(
        "process {pid} moved to {to} (pid {} there): frozen {:.1} ms, total {:.1} ms, {} sent, tracker {}\n",
        num(json, "pid_there").unwrap_or(0.0),
        num(json, "freeze_ms").unwrap_or(0.0),
        num(json, "total_ms").unwrap_or(0.0),
        mib(num(json, "bytes_sent").unwrap_or(0.0)),
        text(json, "tracker").unwrap_or("?")
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_runtime_report() {
        let j = r#"{"freeze_ms":12.500,"total_ms":900.000,"rounds":2,"bytes_sent":2097152,"final_bytes":4096,"stop":"WithinBudget","tracker":"uffd","pid_there":42,"round_detail":[{"bytes":1048576,"ms":10.000,"dirtied":4096,"dirty_rate":409600,"lanes":2},{"bytes":4096,"ms":1.000,"dirtied":0,"dirty_rate":0,"throttle":0.30}],"freeze_detail":{"park_ms":0.200,"collect_ms":1.000,"snapshot_ms":0.500,"pages_ms":3.000,"records_ms":0.300,"restore_ms":5.000,"go_ms":2.500}}"#;
        let h = human(7, "10.0.0.2:7000", j);
        assert!(
            h.contains("round 0: 1.0 MiB in 10.0 ms over 2 connections, dirty rate"),
            "{h}"
        );
        assert!(h.contains("round 1: 0.0 MiB in 1.0 ms, dirty rate"), "{h}");
        assert!(h.contains("round 1: 0.0 MiB"), "{h}");
        assert!(h.contains("dirty rate 0.4 MiB/s\n"), "{h}");
        assert!(h.contains("throttled 30 %"), "{h}");
        assert!(
            h.contains("frozen 12.5 ms, total 900.0 ms, 2.0 MiB sent, tracker uffd"),
            "{h}"
        );
        assert!(h.contains("(pid 42 there)"), "{h}");
        assert!(
            h.contains(
                "freeze (ms): threads parked 0.2, collect 1.0, snapshot 0.5, pages 3.0, records 0.3, restore there 5.0, go 2.5\n"
            ),
            "{h}"
        );
    }
}
