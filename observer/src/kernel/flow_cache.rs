//! The per-CPU flow cache ([`observer_common::FLOW_CACHE_MAP`]), as the
//! collector sees it: before each read of the flow map, the cache's flush
//! program runs once on every online CPU and moves what that CPU counted
//! into the flow map. A CPU that is offline keeps its counts until it is
//! back (it counts nothing meanwhile).

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
};

use super::bpf;

/// Runs the flush program on each CPU.
pub struct FlowCacheFlush {
    program: OwnedFd,
}

impl FlowCacheFlush {
    pub fn new(program: OwnedFd) -> Self {
        Self { program }
    }

    /// Flushes every online CPU's cache into the flow map.
    pub fn flush(&self) -> io::Result<()> {
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
        let cpus = parse_cpu_list(&online).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("/sys/devices/system/cpu/online: {online:?}"),
            )
        })?;
        for cpu in cpus {
            match bpf::run_on_cpu(self.program.as_fd(), cpu) {
                Ok(_) => {}
                // Gone offline since the list was read.
                Err(err) if err.raw_os_error() == Some(libc::ENXIO) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

/// The CPUs of a kernel CPU list (`0-3,6,8-9`).
fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last): (u32, u32) = (first.parse().ok()?, last.parse().ok()?);
                if last < first || last - first > 65_536 {
                    return None;
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::parse_cpu_list;

    #[test]
    fn reads_cpu_lists() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0-2,5,7-8"), Some(vec![0, 1, 2, 5, 7, 8]));
        assert_eq!(parse_cpu_list("3"), Some(vec![3]));
        assert_eq!(parse_cpu_list("2-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }
}
