"""Freed tensor memory is kept for reuse while frames are encoded and tracked, and handed back to the
system when the last propagation ends (glibc; elsewhere nothing changes)."""

from __future__ import annotations

import gc
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


@pytest.fixture(autouse=True)
def _no_scope_open():
    gc.collect()  # an abandoned propagation of an earlier test ends its scope when collected
    assert heap._depth == 0, "a propagation of an earlier test still holds the heap"


def test_freed_activations_are_reused_inside_the_scope_and_given_back_after():
    pages_per_frame = 206 * MIB // os.sysconf("SC_PAGE_SIZE")
    with heap.retained_heap() as kept:
        if not kept:
            pytest.skip("this glibc refused the thresholds")
        _encoder_like_frames(4)  # the heap grows to what a frame needs
        # then the frames' activations land in pages already there (without: 3 frames' pages afresh)
        assert _encoder_like_frames(3) < pages_per_frame
        block = torch.empty(256 * MIB, dtype=torch.uint8).fill_(1)
        del block
        held = _rss()
    # the scope's end returns what the heap keeps free
    assert _rss() < held - 128 * MIB


def test_the_heap_is_kept_until_the_last_scope_of_any_thread_ends():
    entered, may_end = threading.Event(), threading.Event()

    def other_propagation():
        with heap.retained_heap():
            entered.set()
            may_end.wait(30)

    t = threading.Thread(target=other_propagation)
    with heap.retained_heap():
        t.start()
        assert entered.wait(30)
    try:
        # this thread's scope ended while the other's runs: freed memory is still kept for it
        block = torch.empty(256 * MIB, dtype=torch.uint8).fill_(1)
        del block
        held = _rss()
    finally:
        may_end.set()
        t.join(30)
    assert _rss() < held - 128 * MIB
