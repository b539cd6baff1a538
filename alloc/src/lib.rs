//! Ferry's global allocator: [mimalloc], called the way C calls `malloc` whenever the layout's
//! alignment asks for no more than every mimalloc block has anyway.
//!
//! The `mimalloc` crate's `MiMalloc` passes every Rust allocation to `mi_malloc_aligned`. In
//! mimalloc 3 that call has a fast path only for blocks of up to 1 KiB whose next free block
//! happens to be aligned; every larger one (read buffers, boxed futures, header lists) takes
//! the generic aligned path, about four times the instructions of `mi_malloc` (callgrind on
//! the client: 6 such calls per webhook, ~160 instructions each; docs/BENCHMARKS.md, finding
//! 37). [`MiMalloc`] calls `mi_malloc`, `mi_zalloc` and `mi_realloc` for alignments up to a
//! machine word, and the aligned functions above that.
//!
//! [mimalloc]: https://github.com/microsoft/mimalloc

#![no_std]

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;

use libmimalloc_sys as ffi;

/// The alignment every mimalloc block has: block sizes are whole machine words and a page's
/// first block is aligned to at least 16 bytes.
const WORD: usize = core::mem::size_of::<usize>();

/// mimalloc as the global allocator.
///
/// ```
/// #[global_allocator]
/// static GLOBAL: ferry_alloc::MiMalloc = ferry_alloc::MiMalloc;
///
/// let buffer = vec![7u8; 10_000];
/// assert_eq!(buffer.iter().map(|&b| b as usize).sum::<usize>(), 70_000);
/// ```
pub struct MiMalloc;

/// Whether a block from the unaligned functions is aligned enough for `align`.
#[inline]
fn word_aligned(align: usize) -> bool {
    align <= WORD
}

// SAFETY: every block comes from mimalloc and goes back to it (`mi_free` takes blocks from
// either family of functions); blocks from `mi_malloc`, `mi_zalloc` and `mi_realloc` are used
// only for alignments they always satisfy (see `WORD`).
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if word_aligned(layout.align()) {
            ffi::mi_malloc(layout.size()).cast()
        } else {
            ffi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if word_aligned(layout.align()) {
            ffi::mi_zalloc(layout.size()).cast()
        } else {
            ffi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        ffi::mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if word_aligned(layout.align()) {
            ffi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
        } else {
            ffi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
        }
    }
}

#[cfg(test)]
mod tests;
