//! Flow control: how much one side may send on a stream before the other has consumed it.
//!
//! Each direction of each stream starts with [`STREAM_WINDOW`] units of credit. Sending a data
//! frame spends [`frame_cost`] units; the receiver hands units back with
//! [`Control::Window`](crate::Control::Window) once the bytes have been consumed (given to the
//! local app or written to the caller), at least every [`WINDOW_UPDATE_THRESHOLD`] units. A
//! sender with no credit waits, so a slow reader slows the writer down instead of filling memory.
//! A receiver that gets more than the window from a peer resets the stream.
//!
//! Every frame costs a fixed overhead on top of its payload, so a peer cannot flood the receiver
//! with millions of tiny frames either: at most `STREAM_WINDOW / FRAME_OVERHEAD_COST` frames are
//! ever buffered per stream.

/// Credit each direction of a stream starts with, in units (about bytes).
pub const STREAM_WINDOW: u32 = 256 * 1024;

/// Largest payload of one data frame. Larger bodies are sent as several frames.
pub const MAX_FRAME_PAYLOAD: usize = 64 * 1024;

/// Units every frame costs on top of its payload length.
pub const FRAME_OVERHEAD_COST: u32 = 64;

/// Receivers return credit once at least this much has been consumed.
pub const WINDOW_UPDATE_THRESHOLD: u32 = STREAM_WINDOW / 4;

/// Most data frames that can be outstanding on one stream direction.
pub const MAX_FRAMES_IN_WINDOW: usize = (STREAM_WINDOW / FRAME_OVERHEAD_COST) as usize;

/// Credit a data frame with `payload_len` bytes of payload costs.
///
/// Payloads are never larger than [`MAX_FRAME_PAYLOAD`], so the cost always fits in a `u32`.
pub fn frame_cost(payload_len: usize) -> u32 {
    let len = payload_len.min(MAX_FRAME_PAYLOAD) as u32;
    len + FRAME_OVERHEAD_COST
}

// The largest frame plus a pending update must fit in the window, or both sides could wait on
// each other forever (see the module docs).
const _: () = assert!(
    (MAX_FRAME_PAYLOAD as u32) + FRAME_OVERHEAD_COST + WINDOW_UPDATE_THRESHOLD <= STREAM_WINDOW
);

#[cfg(test)]
mod tests {
    use super::*;

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
