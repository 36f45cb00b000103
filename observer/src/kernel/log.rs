//! The programs' diagnostics (aya-log records), in the daemon's log: at
//! their level, with the target `observer::kernel`.

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;

/// Reads the records the programs write; keep it for as long as they run.
pub struct KernelLog(EbpfLogger<Bridge>);

impl KernelLog {
    /// Takes the log map out of `ebpf` (the first load: the map is pinned,
    /// and every instance writes to it).
    pub fn start(ebpf: &mut Ebpf) -> Result<Self, aya_log::Error> {
        EbpfLogger::init_with_logger(ebpf, Bridge).map(Self)
    }

    /// Passes records on as they come, until the runtime stops.
    pub async fn run(self) {
        // SAFETY: the logger owns its ring buffer's descriptor, which stays
        // open and the same until the AsyncFd (which owns the logger) drops.
        let registered =
            unsafe { AsyncFd::register_with_interest(self.0, tokio::io::Interest::READABLE) };
        let mut logger = match registered {
            Ok(logger) => logger,
            Err(err) => {
                tracing::warn!(%err, "cannot read the programs' diagnostics");
                return;
            }
        };
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }
}

/// aya-log speaks the `log` crate; the daemon logs with `tracing`.
struct Bridge;

impl log::Log for Bridge {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "observer::kernel", "{message}"),
            log::Level::Warn => tracing::warn!(target: "observer::kernel", "{message}"),
            log::Level::Info => tracing::info!(target: "observer::kernel", "{message}"),
            log::Level::Debug => tracing::debug!(target: "observer::kernel", "{message}"),
            log::Level::Trace => tracing::trace!(target: "observer::kernel", "{message}"),
        }
    }

    fn flush(&self) {}
}

/// The programs' level for the daemon's: their records are all at debug
/// level or below, so they are on only when the daemon's filter lets debug
/// through somewhere (`--log-level debug`, `observer::kernel=debug`).
pub fn level_for(filter: tracing::level_filters::LevelFilter) -> Option<aya_log::Level> {
    use tracing::level_filters::LevelFilter;
    match filter {
        LevelFilter::DEBUG => Some(aya_log::Level::Debug),
        LevelFilter::TRACE => Some(aya_log::Level::Trace),
        _ => None,
    }
}
