//! Builds the default lab as a test lab (named after this process), prints
//! its name, and waits (at most a minute) to be killed: for the test that a
//! killed run's lab is cleaned up.

use std::{io::Write, time::Duration};

use lab::{Lab, Plan};

fn main() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    println!("{}", lab.name());
    std::io::stdout().flush().expect("stdout");
    std::thread::sleep(Duration::from_secs(60));
}
