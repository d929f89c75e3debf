//! Running a tickpipe binary the way its user would: without the `TICKPIPE_`
//! variables of the test's own environment, and reading its `--help`.

use std::process::{Command, Output};

/// A command for `bin` that inherits no `TICKPIPE_` variable from the test.
pub fn command(bin: &str) -> Command {
    let mut c = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TICKPIPE_") {
            c.env_remove(k);
        }
    }
    c
}

/// Runs `bin` with `args` and `env` (and no other `TICKPIPE_` variable) to its end.
pub fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    command(bin)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run {bin}: {e}"))
}

/// The `--help` paragraph of `flag`.
pub fn help_of(help: &str, flag: &str) -> String {
    let start = help
        .find(&format!("      {flag} "))
        .unwrap_or_else(|| panic!("{flag} in {help}"));
    let rest = &help[start..];
    let end = rest[8..].find("\n      --").map_or(rest.len(), |i| i + 8);
    rest[..end].to_owned()
}

/// The stderr of `out`, a run that must have failed; panics with `what` and
/// the stderr if it succeeded.
pub fn failure_stderr(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{what}: {stderr}");
    stderr
}
