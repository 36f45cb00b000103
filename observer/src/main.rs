//! The `observer` command: see the library's documentation for the layers.

use std::process::ExitCode;

fn main() -> ExitCode {
    observer::cli::main()
}
