//! Flow control: how much one side may send on a stream before the other has consumed it.
//!
//! Each side tells the other its receive window per stream (`window` in `hello` and `welcome`;
//! a peer that does not say has [`DEFAULT_WINDOW`]), and each direction of each stream starts
//! with the receiver's window in units of credit. Sending a data frame spends [`frame_cost`]
//! units; the receiver hands units back with [`Control::Window`](crate::Control::Window) once
//! the bytes have been consumed (given to the local app or written to the caller), at least
//! every [`update_threshold`] units. A sender with no credit waits, so a slow reader slows the
//! writer down instead of filling memory. A receiver that gets more than its window from a peer
//! closes the connection.
//!
//! Every frame costs a fixed overhead on top of its payload, so a peer cannot flood the receiver
//! with millions of tiny frames either: at most [`max_frames`] frames are ever buffered per
//! stream.

/// The receive window this build offers per stream, in units (about bytes), advertised in
/// `hello` and `welcome`. 1 MiB rather than 256 KiB: at 256 KiB, four 5 MiB uploads on a busy
/// 2-core machine left it 20 % idle, each stream waiting for credit (docs/BENCHMARKS.md).
pub const STREAM_WINDOW: u32 = 1024 * 1024;

/// The window of a peer that does not advertise one: that of Ferry builds before windows were
/// negotiated, which enforce it.
pub const DEFAULT_WINDOW: u32 = 256 * 1024;

/// Smallest window a peer may advertise; a smaller one is taken as this.
pub const MIN_WINDOW: u32 = DEFAULT_WINDOW;

/// Largest window a peer may advertise; a larger one is taken as this.
pub const MAX_WINDOW: u32 = 16 * 1024 * 1024;

/// The send window for a peer that advertised `advertised`: [`DEFAULT_WINDOW`] if it did not
/// say, else its value within [`MIN_WINDOW`]..=[`MAX_WINDOW`].
pub fn peer_window(advertised: Option<u32>) -> u32 {
    advertised.map_or(DEFAULT_WINDOW, |window| {
        window.clamp(MIN_WINDOW, MAX_WINDOW)
    })
}

/// A receiver with `window` returns credit once at least this much has been consumed.
pub const fn update_threshold(window: u32) -> u32 {
    window / 4
}

/// Most data frames that can be outstanding on one stream direction with `window`.
pub const fn max_frames(window: u32) -> usize {
    (window / FRAME_OVERHEAD_COST) as usize
}

/// Largest payload of one data frame. Larger bodies are sent as several frames.
pub const MAX_FRAME_PAYLOAD: usize = 64 * 1024;

/// Units every frame costs on top of its payload length.
pub const FRAME_OVERHEAD_COST: u32 = 64;

/// Credit a data frame with `payload_len` bytes of payload costs.
///
/// Payloads are never larger than [`MAX_FRAME_PAYLOAD`], so the cost always fits in a `u32`.
pub fn frame_cost(payload_len: usize) -> u32 {
    let len = payload_len.min(MAX_FRAME_PAYLOAD) as u32;
    len + FRAME_OVERHEAD_COST
}

// The largest frame plus a pending update must fit in any window, or both sides could wait on
// each other forever (see the module docs).
const _: () = assert!(
    (MAX_FRAME_PAYLOAD as u32) + FRAME_OVERHEAD_COST + update_threshold(MIN_WINDOW) <= MIN_WINDOW
);
const _: () = assert!(MIN_WINDOW <= STREAM_WINDOW && STREAM_WINDOW <= MAX_WINDOW);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_windows_default_and_are_clamped() {
        assert_eq!(peer_window(None), DEFAULT_WINDOW);
        assert_eq!(peer_window(Some(STREAM_WINDOW)), STREAM_WINDOW);
        assert_eq!(peer_window(Some(1)), MIN_WINDOW);
        assert_eq!(peer_window(Some(u32::MAX)), MAX_WINDOW);
    }

    #[test]
    fn cost_counts_overhead() {
        assert_eq!(frame_cost(0), FRAME_OVERHEAD_COST);
        assert_eq!(frame_cost(1000), 1000 + FRAME_OVERHEAD_COST);
        assert_eq!(
            frame_cost(MAX_FRAME_PAYLOAD),
            MAX_FRAME_PAYLOAD as u32 + FRAME_OVERHEAD_COST
        );
    }
}
