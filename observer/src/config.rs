//! The optional configuration file of `observer run`: YAML, the long flag
//! names as keys (`metrics-addr: 0.0.0.0:9465`). A flag on the command line
//! wins over the environment, which wins over the file, which wins over the
//! defaults: the file's values are handed to clap as the flags' environment
//! variables, where those are not set already.

use std::{collections::BTreeMap, ffi::OsString, path::PathBuf};

use clap::CommandFactory;

use crate::cli::Cli;

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
}

/// Applies the file named on the command line or in the environment, if
/// any. Call before parsing the command line, while single-threaded.
pub fn apply(args: &[OsString]) -> Result<(), ConfigError> {
    let named = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .or_else(|| {
            args.iter()
                .find_map(|a| a.to_str()?.strip_prefix("--config=").map(PathBuf::from))
        })
        .or_else(|| std::env::var_os(ENV).map(PathBuf::from));
    let Some(path) = named else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let values: BTreeMap<String, serde_norway::Value> =
        serde_norway::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.clone(),
            source,
        })?;
    let cli = Cli::command();
    let run = cli.find_subcommand("run").expect("the run command");
    let args = run.get_arguments().chain(cli.get_arguments());
    let envs: BTreeMap<String, OsString> = args
        .filter_map(|a| Some((a.get_long()?.to_owned(), a.get_env()?.to_owned())))
        .collect();
    for (key, value) in values {
        let Some(env) = envs.get(&key).filter(|_| key != "config") else {
            return Err(ConfigError::Unknown { path, key });
        };
        if std::env::var_os(env).is_some() {
            continue;
        }
        let value = match value {
            serde_norway::Value::String(s) => s,
            serde_norway::Value::Bool(b) => b.to_string(),
            serde_norway::Value::Number(n) => n.to_string(),
            // Lists: comma-separated, as in the environment.
            serde_norway::Value::Sequence(items) => items
                .iter()
                .filter_map(|i| match i {
                    serde_norway::Value::String(s) => Some(s.clone()),
                    other => serde_norway::to_string(other)
                        .ok()
                        .map(|s| s.trim().to_owned()),
                })
                .collect::<Vec<_>>()
                .join(","),
            _ => return Err(ConfigError::Unknown { path, key }),
        };
        // SAFETY: called before any other thread exists (see above).
        unsafe { std::env::set_var(env, value) };
    }
    Ok(())
}
