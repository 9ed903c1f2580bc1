//! omctl parses the whole interface and answers what cannot be done with a clear error.

use std::process::Command;

const OMCTL: &str = env!("CARGO_BIN_EXE_omctl");

fn omctl(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(OMCTL).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn migrate_without_omd_is_a_clear_error() {
    let base = [
        "--control",
        "/nonexistent/omd.sock",
        "migrate",
        "123",
        "--to",
        "10.0.0.2:7070",
    ];
    for transport in [
        &[][..],
        &["--transport", "sci"][..],
        &["--transport", "verbs"][..],
    ] {
        let args: Vec<&str> = base.iter().chain(transport).copied().collect();
        let (code, err) = omctl(&args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains("cannot reach omd"), "{args:?}: {err}");
    }
}

#[test]
fn restart_of_something_that_is_no_checkpoint_names_it() {
    let dir = std::env::temp_dir().join(format!("om-not-a-checkpoint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("om-image"), b"garbage that is not a manifest").unwrap();
    for (d, what) in [
        (
            std::path::PathBuf::from("/nonexistent/ck"),
            "/nonexistent/ck/om-image",
        ),
        (dir.clone(), "no om checkpoint magic"),
    ] {
        let (code, err) = omctl(&["restart", d.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(what), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_omd_the_error_says_so() {
    for args in [
        &["--control", "/nonexistent/om/c.sock", "ps"][..],
        &["--control", "/nonexistent/om/c.sock", "reserve", "4G"][..],
        &[
            "--control",
            "/nonexistent/om/c.sock",
            "checkpoint",
            "123",
            "--out",
            "/tmp/x",
        ][..],
    ] {
        let (code, err) = omctl(args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains("cannot reach omd at /nonexistent/om/c.sock"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn bad_input_is_a_usage_error() {
    for args in [
        &["migrate", "0", "--to", "10.0.0.2:7070"][..],
        &["migrate", "12", "--to", "nowhere"][..],
        &["migrate", "12"][..],
        &["checkpoint", "12"][..],
        &["reserve", "4X"][..],
        &["reserve", "lots"][..],
        &["frobnicate"][..],
    ] {
        let (code, err) = omctl(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains("error:"), "{args:?}: {err}");
    }
}

#[test]
fn help_describes_the_interface() {
    let out = Command::new(OMCTL).args(["migrate", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--to",
        "--json",
        "--downtime",
        "--max-rounds",
        "--transport",
        "--auto-converge",
    ] {
        assert!(help.contains(word), "{word} missing from:\n{help}");
    }
}
