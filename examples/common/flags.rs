//! Slow-client flags shared by the example servers.

use tower_backpressure::Overflow;

/// `--policy`: what a full buffer does.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Policy {
    DropOldest,
    DropNewest,
    Pause,
    Disconnect,
}

impl Policy {
    pub(crate) fn overflow(self) -> Overflow {
        match self {
            Policy::DropOldest => Overflow::DropOldest,
            Policy::DropNewest => Overflow::DropNewest,
            Policy::Pause => Overflow::Pause,
            Policy::Disconnect => Overflow::Disconnect,
        }
    }
}

/// Parses `--gap-marker on|off`.
///
/// Use it with `action = clap::ArgAction::Set`: for a `bool` field clap's
/// derive otherwise makes a flag without a value, whose implicit `true` then
/// fails this parser.
pub(crate) fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}
