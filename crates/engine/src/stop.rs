//! A requested stop (the binary's SIGINT/SIGTERM handler calls [`request`]): the first request
//! ends the run after the current epoch's checkpoint, the second after the current step (the
//! interrupted epoch then replays on resume). A signal is process-wide, so the request is too:
//! every training loop of the process (a teacher being trained for the cache included) sees it.

use std::sync::atomic::{AtomicU8, Ordering};

static LEVEL: AtomicU8 = AtomicU8::new(0);

/// Ask the running loops to stop; returns how many requests there have been.
pub fn request() -> u8 {
    LEVEL.fetch_add(1, Ordering::SeqCst).saturating_add(1)
}

/// 0: no request; 1: stop after the epoch; 2 or more: stop after the step.
pub fn level() -> u8 {
    LEVEL.load(Ordering::SeqCst)
}
