use super::*;

/// Sizes around mimalloc's size classes and its small/medium/large limits.
const SIZES: &[usize] = &[
    1,
    2,
    3,
    7,
    8,
    9,
    15,
    16,
    17,
    24,
    40,
    64,
    100,
    1000,
    1024,
    1025,
    2000,
    4096,
    8192,
    10_000,
    65_536,
    100_000,
    1 << 20,
];
const ALIGNS: &[usize] = &[1, 2, 4, 8, 16, 32, 64, 128, 4096];

fn each_layout(mut f: impl FnMut(Layout)) {
    for &size in SIZES {
        for &align in ALIGNS {
            f(Layout::from_size_align(size, align).unwrap());
        }
    }
}

fn assert_aligned(ptr: *mut u8, layout: Layout) {
    assert!(!ptr.is_null(), "{layout:?}");
    assert_eq!(ptr as usize % layout.align(), 0, "{layout:?}");
}

#[test]
fn blocks_are_aligned_and_writable() {
    each_layout(|layout| {
        // Several at once, so that later blocks come from the middle of a page.
        let blocks: [*mut u8; 8] = core::array::from_fn(|i| {
            let ptr = unsafe { MiMalloc.alloc(layout) };
            assert_aligned(ptr, layout);
            unsafe { ptr.write_bytes(i as u8, layout.size()) };
            ptr
        });
        for (i, &ptr) in blocks.iter().enumerate() {
            let last = unsafe { *ptr.add(layout.size() - 1) };
            assert_eq!(last, i as u8, "{layout:?}");
            unsafe { MiMalloc.dealloc(ptr, layout) };
        }
    });
}

#[test]
fn zeroed_blocks_are_zero() {
    each_layout(|layout| {
        // Dirty a block first, so that a reused one would show.
        let dirty = unsafe { MiMalloc.alloc(layout) };
        unsafe { dirty.write_bytes(0xAB, layout.size()) };
        unsafe { MiMalloc.dealloc(dirty, layout) };
        let ptr = unsafe { MiMalloc.alloc_zeroed(layout) };
        assert_aligned(ptr, layout);
        let bytes = unsafe { core::slice::from_raw_parts(ptr, layout.size()) };
        assert!(bytes.iter().all(|&b| b == 0), "{layout:?}");
        unsafe { MiMalloc.dealloc(ptr, layout) };
    });
}

#[test]
fn realloc_keeps_the_contents_and_the_alignment() {
    each_layout(|layout| {
        for new_size in [layout.size() * 3 + 5, layout.size().div_ceil(2)] {
            let ptr = unsafe { MiMalloc.alloc(layout) };
            let len = layout.size();
            unsafe { core::slice::from_raw_parts_mut(ptr, len) }
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = i as u8);
            let moved = unsafe { MiMalloc.realloc(ptr, layout, new_size) };
            let new_layout = Layout::from_size_align(new_size, layout.align()).unwrap();
            assert_aligned(moved, new_layout);
            let kept = unsafe { core::slice::from_raw_parts(moved, len.min(new_size)) };
            let expected = (0..kept.len()).map(|i| i as u8);
            assert!(
                kept.iter().copied().eq(expected),
                "{layout:?} -> {new_size}"
            );
            unsafe { MiMalloc.dealloc(moved, new_layout) };
        }
    });
}
