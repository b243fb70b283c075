"""Freed tensor memory is kept for reuse while frames are encoded and tracked, and handed back to the
system when the last propagation ends (glibc; elsewhere nothing changes)."""

from __future__ import annotations

import os
import resource
import threading

import pytest
import torch

from napari_sam2 import heap

pytestmark = pytest.mark.skipif(heap._libc() is None, reason="needs glibc's mallopt / malloc_trim")

MIB = 1 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _encoder_like_frames(frames: int) -> int:
    """Minor page faults of ``frames`` rounds of allocating, filling and freeing three large activations."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(frames):
        acts = [torch.empty(size * MIB, dtype=torch.uint8).fill_(1) for size in (96, 40, 70)]
        del acts
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_activations_are_reused_inside_the_scope_and_given_back_after():
    pages_per_frame = 206 * MIB // os.sysconf("SC_PAGE_SIZE")
    with heap.retained_heap() as kept:
        assert kept
        _encoder_like_frames(4)  # the heap grows to what a frame needs
        # then every frame's activations land in pages already there: nothing to fault in and zero again
        assert _encoder_like_frames(3) < 3 * pages_per_frame // 10
        block = torch.empty(256 * MIB, dtype=torch.uint8).fill_(1)
        del block
        held = _rss()
    # the scope's end returns what the heap keeps free
    assert _rss() < held - 128 * MIB


def test_the_heap_is_kept_until_the_last_scope_of_any_thread_ends():
    inner_done, outer_may_end = threading.Event(), threading.Event()
    inside = {}

    def other_propagation():
        with heap.retained_heap():
            outer_may_end.wait(30)

    t = threading.Thread(target=other_propagation)
    with heap.retained_heap():
        t.start()
    try:
        # this thread's scope ended while the other runs: freed memory is still kept for it
        block = torch.empty(256 * MIB, dtype=torch.uint8).fill_(1)
        del block
        inside["rss"] = _rss()
        inner_done.set()
    finally:
        outer_may_end.set()
        t.join(30)
    assert _rss() < inside["rss"] - 128 * MIB
