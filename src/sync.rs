//! The synchronization primitives of the client state machine, the memory
//! budget and the hub's log: the standard library's, or loom's when the
//! crate is built for its model checks (`RUSTFLAGS="--cfg backpressure_loom"`,
//! see `src/client/loom.rs` and `src/hub/loom.rs`).

#[cfg(backpressure_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
#[cfg(backpressure_loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(not(backpressure_loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
#[cfg(not(backpressure_loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};
