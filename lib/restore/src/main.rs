//! `om-restore DIR`: restores the checkpoint in DIR (issue #5, in progress).
fn main() -> std::process::ExitCode {
    eprintln!(
        "om-restore: error: {}",
        om::Unavailable::new(om::Feature::Restart)
    );
    std::process::ExitCode::from(69)
}
