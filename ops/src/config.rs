//! The consumers' configuration file: TOML whose keys preset flags.
//!
//! Every flag has an environment variable; the same name without `TICKPIPE_`,
//! lowercased and split into tables wherever an underscore is, is its key in
//! the file. `TICKPIPE_CANDLES_ALLOWED_LATENESS_MS` is
//!
//! ```toml
//! [candles]
//! allowed_lateness_ms = 5000
//! ```
//!
//! (or `candles_allowed_lateness_ms = 5000` at the top). Flags that take a
//! list take a TOML array (or one comma-separated string); an array for any
//! other flag is an error.
//! The `[librdkafka]` table is the exception: its keys are librdkafka property
//! names (`security.protocol = "SASL_SSL"`, dotted keys or nested tables),
//! given to every Kafka client of the process under the
//! `TICKPIPE_LIBRDKAFKA_*` variables, which win.
//! A value from the file takes the place of the built-in default, so a flag or
//! environment variable still overrides it; values are checked exactly as if
//! they had been typed. A key that names no flag of this binary is an error, so
//! a typo never goes unnoticed, and a secret given in the file is never shown
//! by `--help`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clap::Command;

/// The `--config` flag, flattened into a binary's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// TOML file presetting flags: the key of a flag is its environment
    /// variable without TICKPIPE_ (e.g. `[candles] allowed_lateness_ms = 5000`);
    /// flags and environment variables override the file.
    #[arg(long, env = "TICKPIPE_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("configuration file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Parses the command line of `T`, with the defaults taken from the file given
/// by `--config` or `TICKPIPE_CONFIG`. Exits like any clap parse on `--help` or
/// a bad value.
pub fn parse<T: clap::Parser>() -> Result<T, ConfigError> {
    parse_from(std::env::args_os().collect(), std::env::var_os("TICKPIPE_CONFIG"))
}

/// [`parse`] over given arguments and `TICKPIPE_CONFIG` value.
pub fn parse_from<T: clap::Parser>(args: Vec<OsString>, env: Option<OsString>) -> Result<T, ConfigError> {
    let mut command = with_global_flags(T::command());
    if let Some(path) = config_path(&args).or(env.map(PathBuf::from)) {
        let (preset, properties) = preset(command, &path)?;
        command = preset;
        set_librdkafka_properties(properties);
    }
    let matches = command.get_matches_from(args);
    T::from_arg_matches(&matches).map_err(|e| e.exit())
}

/// `command` with every flag of its own (not its subcommands') also taken
/// after a subcommand: `producer replay --brokers ...` as `producer --brokers
/// ... replay`.
fn with_global_flags(command: Command) -> Command {
    if !command.has_subcommands() {
        return command;
    }
    command.mut_args(|a| if a.is_positional() { a } else { a.global(true) })
}

/// `T` as an empty command line gives it, the environment unread: every
/// flag at its built-in default. The `Default` of a configuration section.
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let command = T::augment_args(Command::new("defaults")).mut_args(|a| a.env(None));
    let parsed = command
        .try_get_matches_from(["defaults"])
        .and_then(|m| T::from_arg_matches(&m));
    match parsed {
        Ok(t) => t,
        // A default that does not parse is a bug in the flag's declaration.
        Err(e) => panic!("the built-in defaults do not parse: {e}"),
    }
}

/// The value of `--config` on the command line, if given there.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut args = args.iter().skip(1);
    while let Some(a) = args.next() {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// The librdkafka properties of the configuration file, for every Kafka
/// client of the process. Process-wide like the environment they sit under,
/// and set once, by the binary at start (`parse`, or the producer's own file
/// reader).
static LIBRDKAFKA: OnceLock<Vec<(String, String)>> = OnceLock::new();

/// Sets the file's librdkafka properties; only the first call counts.
pub fn set_librdkafka_properties(properties: Vec<(String, String)>) {
    let _ = LIBRDKAFKA.set(properties);
}

/// The file's librdkafka properties (none when no file set them).
pub fn librdkafka_properties() -> &'static [(String, String)] {
    LIBRDKAFKA.get().map_or(&[], Vec::as_slice)
}

/// A `[librdkafka]` table as (property, value) pairs, sorted: nested tables
/// and dotted keys join with `.`, lists with `,` (librdkafka's list syntax).
pub fn librdkafka_table(table: &toml::Table) -> Result<Vec<(String, String)>, String> {
    let mut properties = BTreeMap::new();
    for (k, v) in table {
        flatten(k, ".", v, &mut properties)?;
    }
    Ok(properties.into_iter().map(|(k, v)| (k, v.text)).collect())
}

/// `command` with the defaults of the flags the file at `path` sets, and the
/// file's librdkafka properties.
pub fn preset(command: Command, path: &Path) -> Result<(Command, Vec<(String, String)>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_owned(),
        message,
    };
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| invalid(e.to_string()))?;
    let properties = match table.remove("librdkafka") {
        None => Vec::new(),
        Some(toml::Value::Table(t)) => librdkafka_table(&t).map_err(invalid)?,
        Some(_) => return Err(invalid("librdkafka must be a table of librdkafka properties".into())),
    };
    let mut values = BTreeMap::new();
    flatten("", "_", &toml::Value::Table(table), &mut values).map_err(invalid)?;

    let flags = flags(&command, None);
    let mut command = command;
    for (key, value) in values {
        let env = format!("TICKPIPE_{}", key.to_uppercase());
        let Some(Flag {
            subcommand,
            id,
            secret,
            takes_list,
        }) = flags.get(&env)
        else {
            let known: Vec<String> = flags
                .keys()
                .filter(|e| *e != "TICKPIPE_CONFIG")
                .map(|e| key_of(e))
                .collect();
            return Err(invalid(format!(
                "unknown key {key:?} (it would set {env}); this program takes: {}",
                known.join(", ")
            )));
        };
        if env == "TICKPIPE_CONFIG" {
            return Err(invalid("a configuration file cannot name another one".into()));
        }
        if value.list && !takes_list {
            return Err(invalid(format!(
                "{key} takes one value, not a list (a value that is itself comma-separated, such as \
                 bootstrap servers, is one string: \"a:9092,b:9092\")"
            )));
        }
        let secret = *secret;
        let preset = |arg: clap::Arg| arg.default_value(value.text).hide_default_value(secret);
        command = match subcommand {
            None => command.mut_arg(id.as_str(), preset),
            Some(name) => command.mut_subcommand(name.as_str(), |s| s.mut_arg(id.as_str(), preset)),
        };
    }
    Ok((command, properties))
}

/// A flag a file key can preset.
struct Flag {
    /// The subcommand that takes it, if not the program itself.
    subcommand: Option<String>,
    id: String,
    secret: bool,
    takes_list: bool,
}

/// The flags of `command` and of its subcommands, by environment variable.
fn flags(command: &Command, subcommand: Option<&str>) -> BTreeMap<String, Flag> {
    let mut out: BTreeMap<String, Flag> = command
        .get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_str()?.to_owned();
            let flag = Flag {
                subcommand: subcommand.map(str::to_owned),
                id: a.get_id().to_string(),
                secret: a.is_hide_env_values_set(),
                takes_list: a.get_value_delimiter().is_some(),
            };
            Some((env, flag))
        })
        .collect();
    if subcommand.is_none() {
        for s in command.get_subcommands() {
            for (env, flag) in flags(s, Some(s.get_name())) {
                out.entry(env).or_insert(flag);
            }
        }
    }
    out
}

/// The file key of an environment variable, as the error message shows it.
fn key_of(env: &str) -> String {
    env.trim_start_matches("TICKPIPE_").to_lowercase()
}

/// A scalar, or a list joined with `,`, as a flag's text.
struct Flat {
    text: String,
    /// Written as a TOML array.
    list: bool,
}

/// Collects `prefix<sep>key = value` for every scalar or list in `value`.
fn flatten(prefix: &str, sep: &str, value: &toml::Value, out: &mut BTreeMap<String, Flat>) -> Result<(), String> {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_owned()
        } else {
            format!("{prefix}{sep}{k}")
        }
    };
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                flatten(&join(k), sep, v, out)?;
            }
        }
        toml::Value::Array(items) => {
            let items: Result<Vec<String>, String> = items
                .iter()
                .map(|v| {
                    scalar(v).ok_or_else(|| format!("{prefix}: a list may hold only strings, numbers and booleans"))
                })
                .collect();
            let text = items?.join(",");
            out.insert(prefix.to_owned(), Flat { text, list: true });
        }
        v => {
            let text = scalar(v).ok_or_else(|| format!("{prefix}: unsupported value"))?;
            out.insert(prefix.to_owned(), Flat { text, list: false });
        }
    }
    Ok(())
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(d) => Some(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Debug, Parser)]
    struct Args {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, env = "TICKPIPE_TEST_LATENESS_MS", default_value_t = 2000)]
        lateness_ms: i64,
        #[arg(
            long,
            env = "TICKPIPE_TEST_INTERVALS",
            value_delimiter = ',',
            default_value = "1s,1m"
        )]
        intervals: Vec<String>,
        #[arg(long, env = "TICKPIPE_TEST_FILL", default_value_t = true, action = clap::ArgAction::Set)]
        fill: bool,
        #[arg(long, env = "TICKPIPE_TEST_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    }

    fn file(text: &str) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("c.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    /// A directory removed on drop.
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static N: AtomicUsize = AtomicUsize::new(0);
                let p = std::env::temp_dir().join(format!(
                    "tickpipe-config-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn try_parse(path: &Path, argv: &[&str]) -> Result<Args, String> {
        let (command, _) = preset(Args::command(), path).map_err(|e| e.to_string())?;
        let m = command.try_get_matches_from(args(argv)).map_err(|e| e.to_string())?;
        Args::from_arg_matches(&m).map_err(|e| e.to_string())
    }

    #[test]
    fn the_file_replaces_defaults_and_flags_override_it() {
        let (_d, path) = file("test_fill = false\n\n[test]\nlateness_ms = 5000\nintervals = [\"5s\", \"1h\"]\n");
        let a = try_parse(&path, &["x"]).unwrap();
        assert_eq!(
            (a.lateness_ms, a.intervals.clone(), a.fill),
            (5000, vec!["5s".into(), "1h".into()], false)
        );
        let a = try_parse(&path, &["x", "--lateness-ms", "7"]).unwrap();
        assert_eq!((a.lateness_ms, a.intervals), (7, vec!["5s".to_string(), "1h".into()]));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_the_key() {
        let (_d, path) = file("[test]\nlateness = 5000\n");
        let e = try_parse(&path, &["x"]).unwrap_err();
        assert!(
            e.contains("unknown key \"test_lateness\"") && e.contains("test_lateness_ms"),
            "{e}"
        );
        let (_d, path) = file("[test]\nlateness_ms = \"soon\"\n");
        let e = try_parse(&path, &["x"]).unwrap_err();
        assert!(e.contains("soon") && e.contains("lateness-ms"), "{e}");
        let (_d, path) = file("[test\n");
        let e = try_parse(&path, &["x"]).unwrap_err();
        assert!(e.contains("c.toml"), "{e}");
        let (_d, path) = file("[test]\nlateness_ms = [1, 2]\n");
        let e = try_parse(&path, &["x"]).unwrap_err();
        assert!(e.contains("test_lateness_ms takes one value, not a list"), "{e}");
        let e = try_parse(Path::new("/nonexistent/tickpipe.toml"), &["x"]).unwrap_err();
        assert!(e.contains("/nonexistent/tickpipe.toml"), "{e}");
    }

    #[test]
    fn the_librdkafka_table_holds_properties_not_flags() {
        let (_d, path) = file(
            r#"
            test_lateness_ms = 9
            [librdkafka]
            security.protocol = "SASL_SSL"
            "sasl.mechanisms" = "SCRAM-SHA-512"
            debug = ["broker", "protocol"]
            socket.keepalive.enable = true
            [librdkafka.ssl]
            ca.location = "/etc/ca.pem"
            "#,
        );
        let (command, properties) = preset(Args::command(), &path).unwrap();
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        assert_eq!(
            properties,
            pairs(&[
                ("debug", "broker,protocol"),
                ("sasl.mechanisms", "SCRAM-SHA-512"),
                ("security.protocol", "SASL_SSL"),
                ("socket.keepalive.enable", "true"),
                ("ssl.ca.location", "/etc/ca.pem"),
            ])
        );
        let a = Args::from_arg_matches(&command.get_matches_from(["x"])).unwrap();
        assert_eq!(a.lateness_ms, 9, "the flags around it still apply");
        let (_d, path) = file("librdkafka = \"acks=1\"\n");
        let e = try_parse(&path, &["x"]).unwrap_err();
        assert!(e.contains("librdkafka must be a table"), "{e}");
    }

    #[test]
    fn secrets_from_the_file_stay_out_of_help() {
        let (_d, path) = file("test_password = \"hunter2\"\n");
        let a = try_parse(&path, &["x"]).unwrap();
        assert_eq!(a.password.as_deref(), Some("hunter2"));
        let help = preset(Args::command(), &path).unwrap().0.render_long_help().to_string();
        assert!(!help.contains("hunter2"), "{help}");
        assert!(help.contains("TICKPIPE_TEST_PASSWORD"));
    }

    #[derive(Debug, Parser)]
    struct WithCommands {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, env = "TICKPIPE_TEST_BROKERS", default_value = "a:9092")]
        brokers: String,
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Sub {
        Backfill {
            #[arg(long, env = "TICKPIPE_BACKFILL_SINCE", default_value = "5y")]
            since: String,
        },
    }

    #[test]
    fn a_key_presets_a_subcommands_flag_and_flags_follow_the_subcommand() {
        let (_d, path) = file("[test]\nbrokers = \"f:9092\"\n[backfill]\nsince = \"1w\"\n");
        let config = path.to_str().unwrap();
        let a: WithCommands = parse_from(args(&["x", "--config", config, "backfill"]), None).unwrap();
        let Sub::Backfill { since } = &a.command;
        assert_eq!((a.brokers.as_str(), since.as_str()), ("f:9092", "1w"));
        let a: WithCommands =
            parse_from(args(&["x", "backfill", "--brokers", "g:9092", "--since", "2d"]), None).unwrap();
        let Sub::Backfill { since } = &a.command;
        assert_eq!((a.brokers.as_str(), since.as_str()), ("g:9092", "2d"));
    }

    #[test]
    fn defaults_ignore_the_environment() {
        #[derive(Debug, clap::Args)]
        struct Section {
            #[arg(long, env = "TICKPIPE_OPS_DEFAULTS_TEST", default_value_t = 7)]
            n: u32,
        }
        // The variable is this test's own; no other test reads it.
        std::env::set_var("TICKPIPE_OPS_DEFAULTS_TEST", "8");
        assert_eq!(defaults::<Section>().n, 7);
    }

    #[test]
    fn the_path_comes_from_the_flag_or_the_environment() {
        assert_eq!(
            config_path(&args(&["x", "--config", "a.toml"])),
            Some(PathBuf::from("a.toml"))
        );
        assert_eq!(
            config_path(&args(&["x", "--config=b.toml"])),
            Some(PathBuf::from("b.toml"))
        );
        assert_eq!(config_path(&args(&["x", "--", "--config", "c"])), None);
        let (_d, path) = file("[test]\nlateness_ms = 9\n");
        let a: Args = parse_from(args(&["x"]), Some(path.clone().into_os_string())).unwrap();
        assert_eq!(a.lateness_ms, 9);
        assert_eq!(a.config.config, None);
        let a: Args = parse_from(args(&["x", "--config", path.to_str().unwrap()]), None).unwrap();
        assert_eq!((a.lateness_ms, a.config.config), (9, Some(path)));
    }
}
