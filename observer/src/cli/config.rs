//! The optional configuration file of `observer run`: YAML, the long flag
//! names as keys (`metrics-addr: 0.0.0.0:9465`). A flag on the command line
//! wins over the environment, which wins over the file, which wins over the
//! defaults.
//!
//! How: clap parses the command line once leniently, which tells where each
//! setting came from; every file setting that came from nowhere better is
//! then given to clap as the flag it names, and clap parses (and checks)
//! the whole again. The file's values go through the same parsers as the
//! flags, and nothing touches the process' environment.

use std::{collections::BTreeMap, ffi::OsString, path::PathBuf};

use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, parser::ValueSource};
use serde_norway::Value;

use super::Cli;

/// Where the file is named: `--config FILE` or `OBSERVER_CONFIG`.
pub const ENV: &str = "OBSERVER_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the configuration file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_norway::Error,
    },
    #[error(
        "the configuration file {path}: `{key}` is not a setting of `observer run` (settings are its long flag names)"
    )]
    Unknown { path: PathBuf, key: String },
    #[error("the configuration file {path}: `{key}`: {problem}")]
    Value {
        path: PathBuf,
        key: String,
        problem: &'static str,
    },
}

/// The command line, with the configuration file's settings where neither
/// a flag nor the environment gives them. Usage errors exit as clap does.
pub fn parse(args: Vec<OsString>) -> Result<Cli, ConfigError> {
    let lenient = Cli::command()
        .ignore_errors(true)
        .try_get_matches_from(&args)
        .ok();
    let named = lenient
        .as_ref()
        .and_then(|m| m.get_one::<PathBuf>("config").cloned());
    let Some(path) = named else {
        return Ok(Cli::parse_from(args));
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let values: BTreeMap<String, Value> = match serde_norway::from_str(&text) {
        Ok(values) => values,
        // An empty file holds no settings.
        Err(_) if text.trim().is_empty() => BTreeMap::new(),
        Err(source) => return Err(ConfigError::Parse { path, source }),
    };
    let run = lenient
        .as_ref()
        .and_then(|m| m.subcommand_matches("run").cloned());
    let cli = Cli::command();
    let run_command = cli.find_subcommand("run").expect("the run command");
    let mut extra: Vec<OsString> = Vec::new();
    for (key, value) in values {
        let error = |problem| ConfigError::Value {
            path: path.clone(),
            key: key.clone(),
            problem,
        };
        let setting = |a: &&clap::Arg| {
            a.get_long() == Some(key.as_str())
                && key != "config"
                && !matches!(
                    a.get_action(),
                    ArgAction::Help
                        | ArgAction::HelpShort
                        | ArgAction::HelpLong
                        | ArgAction::Version
                )
        };
        let global = cli.get_arguments().find(setting);
        let arg = global
            .or_else(|| run_command.get_arguments().find(setting))
            .ok_or_else(|| ConfigError::Unknown {
                path: path.clone(),
                key: key.clone(),
            })?;
        // Another command than `run` takes the global settings only.
        if run.is_none() && global.is_none() {
            continue;
        }
        // A flag given on the command line or in the environment wins. (A
        // global one is in the top-level matches, a `run` one in its own.)
        let matches = if global.is_some() {
            lenient.as_ref()
        } else {
            run.as_ref()
        };
        let given = matches
            .and_then(|m| m.value_source(arg.get_id().as_str()))
            .is_some_and(|source| {
                matches!(source, ValueSource::CommandLine | ValueSource::EnvVariable)
            });
        if given {
            continue;
        }
        let flag = OsString::from(format!("--{key}"));
        let switch = matches!(arg.get_action(), ArgAction::SetTrue);
        let delimiter = arg.get_value_delimiter();
        match value {
            Value::Bool(on) if switch => {
                if on {
                    extra.push(flag);
                }
            }
            _ if switch => return Err(error("expected true or false")),
            Value::Sequence(items) => {
                for item in items {
                    let item =
                        scalar(&item).ok_or_else(|| error("list items must be plain values"))?;
                    if delimiter.is_some_and(|d| item.contains(d)) {
                        return Err(error(
                            "a list item may not contain `,`: give each as its own item",
                        ));
                    }
                    extra.push(flag.clone());
                    extra.push(checked(item).map_err(error)?);
                }
            }
            value => {
                let text =
                    scalar(&value).ok_or_else(|| error("expected a plain value, not a mapping"))?;
                extra.push(flag);
                extra.push(checked(text).map_err(error)?);
            }
        }
    }
    let mut args = args;
    args.extend(extra);
    let matches = Cli::command().get_matches_from(args);
    Ok(Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit()))
}

/// A scalar as text: what it would be on the command line.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// No value holds a NUL byte: no path, address or name can.
fn checked(value: String) -> Result<OsString, &'static str> {
    if value.contains('\0') {
        return Err("a value may not contain a NUL byte");
    }
    Ok(value.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;

    fn parse_with(file: &str, args: &[&str]) -> Result<Cli, ConfigError> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("observer-config-{}-{n}.yaml", std::process::id()));
        std::fs::write(&path, file).unwrap();
        let mut argv: Vec<OsString> =
            vec!["observer".into(), "--config".into(), path.clone().into()];
        argv.extend(args.iter().map(OsString::from));
        let result = parse(argv);
        let _ = std::fs::remove_file(&path);
        result
    }

    fn run_args(cli: Cli) -> Box<crate::cli::RunArgs> {
        match cli.command {
            Command::Run(args) => args,
            _ => panic!("not run"),
        }
    }

    #[test]
    fn the_file_fills_in_and_the_command_line_wins() {
        let file =
            "inventory: /a.json\nflow-capacity: 64\ndrop-labels: [port, peer]\nlog-level: debug\n";
        let cli = parse_with(file, &["run", "--flow-capacity", "128"]).unwrap();
        assert_eq!(cli.log_level, "debug");
        let run = run_args(cli);
        assert_eq!(run.flow_capacity, 128, "the flag wins");
        assert_eq!(
            run.inventory.as_deref(),
            Some(std::path::Path::new("/a.json"))
        );
        assert_eq!(run.drop_labels, ["port", "peer"]);
    }

    /// A duration past any clock: clap's message (and exit), no panic
    /// later when it is added to one.
    #[test]
    fn a_duration_that_would_overflow_is_refused() {
        let matches = Cli::command().try_get_matches_from([
            "observer",
            "run",
            "--series-grace",
            "18446744073709551615s",
        ]);
        let err = matches.map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("too long"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        for (file, words) in [
            ("inventory: \"a\\0b\"\n", "NUL"),
            ("drop-labels: [\"port,peer\"]\n", "may not contain `,`"),
            ("inventory: {path: /a}\n", "not a mapping"),
            ("drop-labels: [[port]]\n", "plain values"),
            ("no-such-setting: 1\n", "not a setting"),
            ("kubernetes: maybe\n", "true or false"),
            ("- a list\n", "is not valid"),
        ] {
            let err = parse_with(file, &["run"])
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(err.contains(words), "{file:?}: {err}");
        }
    }
}
