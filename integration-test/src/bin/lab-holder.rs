//! Builds the default lab as a test lab (named after this process), on the
//! runtime given as the first argument (`process` by default), prints its
//! name, and waits (at most a minute) to be killed: for the tests that a
//! killed run's lab is cleaned up.

use std::{io::Write, time::Duration};

use lab::{Lab, Plan, Runtime};

fn main() {
    let runtime: Runtime = std::env::args()
        .nth(1)
        .map_or(Ok(Runtime::Process), |arg| arg.parse())
        .expect("a runtime");
    let lab = Lab::up_for_test(&Plan::default_lab().with_runtime(runtime)).expect("lab up");
    println!("{}", lab.name());
    std::io::stdout().flush().expect("stdout");
    std::thread::sleep(Duration::from_secs(60));
}
