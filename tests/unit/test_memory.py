"""coe.backends.memory: page-cache residency, sequential reads and the reusable host buffer pool."""
from __future__ import annotations

import os

import pytest

from coe.backends.memory import (PAGE_BYTES, HostBufferPool, anon_rss_bytes, drop_file_cache, huge_page_environment,
                                 read_sequential, resident_file_bytes)

SIZE = 3 * 2**20 + 123  # not a whole number of pages


@pytest.fixture
def data_file(tmp_path):
    """A file on disk (synced, so its pages are clean and may be dropped) with random content."""
    path = tmp_path / "weights.bin"
    data = os.urandom(SIZE)
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path, data


def dropped(path) -> None:
    if resident_file_bytes(path) is None:
        pytest.skip("mincore is not available here")
    if not drop_file_cache(path):
        pytest.skip("the kernel kept this file in the page cache (tmpfs or an overlay that ignores fadvise)")


def test_reading_a_file_puts_all_of_it_in_the_page_cache(data_file):
    path, _ = data_file
    dropped(path)
    assert resident_file_bytes(path) < PAGE_BYTES * 16
    assert read_sequential(path) == SIZE
    assert resident_file_bytes(path) == SIZE  # whole pages, capped at the file's size


def test_drop_file_cache_empties_the_page_cache_of_a_file(data_file):
    path, data = data_file
    path.read_bytes()
    assert resident_file_bytes(path) == SIZE
    dropped(path)
    assert resident_file_bytes(path) < PAGE_BYTES * 16
    assert path.read_bytes() == data  # nothing lost, only uncached


def test_resident_bytes_of_a_partly_read_file_is_page_aligned(data_file):
    path, _ = data_file
    dropped(path)
    with path.open("rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead past what we read
        f.read(10 * PAGE_BYTES)
    resident = resident_file_bytes(path)
    assert resident % PAGE_BYTES == 0
    assert 10 * PAGE_BYTES <= resident < SIZE


def test_an_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert resident_file_bytes(path) in (0, None)
    assert read_sequential(path) == 0
    assert read_sequential(path, memoryview(bytearray(4))) == 0


def test_read_sequential_into_existing_memory_returns_the_exact_content(data_file, monkeypatch):
    path, data = data_file
    monkeypatch.setattr("coe.backends.memory.READ_CHUNK_BYTES", 2**20)  # several chunks and a short tail
    target = bytearray(SIZE + 100)
    target[SIZE:] = b"\xee" * 100
    assert read_sequential(path, memoryview(target)) == SIZE
    assert bytes(target[:SIZE]) == data
    assert bytes(target[SIZE:]) == b"\xee" * 100  # nothing written past the file's size


def test_read_sequential_into_a_torch_buffer(data_file):
    torch = pytest.importorskip("torch")
    path, data = data_file
    buffer = torch.empty(SIZE, dtype=torch.uint8)
    assert read_sequential(path, memoryview(buffer.numpy())) == SIZE
    assert buffer.numpy().tobytes() == data


def test_read_sequential_reports_a_file_that_shrank(data_file):
    path, _ = data_file

    class Shrunk(type(path)):
        """Its stat says 10 bytes more than there are, as if the file shrank after it was taken."""

        def stat(self, **kwargs):
            fields = list(super().stat(**kwargs))
            fields[6] += 10  # st_size
            return os.stat_result(fields)

    with pytest.raises(OSError, match=f"file ended after {SIZE} of {SIZE + 10} bytes"):
        read_sequential(Shrunk(path), memoryview(bytearray(SIZE + 10)))


def test_anon_rss_grows_with_touched_memory():
    before = anon_rss_bytes()
    if before is None:
        pytest.skip("no /proc/self/status")
    # fresh anonymous pages, written: malloc could hand back memory freed earlier in the test run
    # that is still resident (it did, after the in-process LoRA tests), and then RSS would not move
    import mmap

    block = mmap.mmap(-1, 64 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # RssAnon
    block.write(b"\x01" * (64 * 2**20))
    after = anon_rss_bytes()
    assert after - before >= 32 * 2**20
    block.close()


# ---- HostBufferPool ----------------------------------------------------------------------------

@pytest.fixture
def pool():
    pytest.importorskip("torch")
    return HostBufferPool()


def test_acquire_allocates_a_uint8_buffer(pool):
    import torch

    buf = pool.acquire(1000)
    assert buf.dtype == torch.uint8 and buf.numel() == 1000 and not buf.is_pinned()
    assert (pool.num_allocated, pool.num_reused, pool.free_bytes) == (1, 0, 0)


def test_a_released_buffer_is_reused_when_it_fits_within_twice_the_request(pool):
    buf = pool.acquire(1000)
    pool.release(buf)
    assert pool.free_bytes == 1000
    assert pool.fitting_bytes(1000) == 1000 and pool.fitting_bytes(500) == 1000
    assert pool.acquire(1000) is buf
    assert (pool.num_allocated, pool.num_reused, pool.free_bytes) == (1, 1, 0)
    pool.release(buf)
    assert pool.acquire(500) is buf  # 1000 <= 2 x 500: reused
    pool.release(buf)
    assert pool.num_reused == 2


@pytest.mark.parametrize("request_bytes", [1001, 499, 1])
def test_a_buffer_too_small_or_too_wasteful_is_not_reused(pool, request_bytes):
    buf = pool.acquire(1000)
    pool.release(buf)
    assert pool.fitting_bytes(request_bytes) == 0
    other = pool.acquire(request_bytes)
    assert other is not buf and other.numel() == request_bytes
    assert (pool.num_allocated, pool.num_reused, pool.free_bytes) == (2, 0, 1000)


def test_the_smallest_fitting_buffer_is_reused(pool):
    big, small, tiny = pool.acquire(1800), pool.acquire(1200), pool.acquire(100)
    for buf in (big, small, tiny):
        pool.release(buf)
    assert pool.fitting_bytes(1000) == 1200
    assert pool.acquire(1000) is small
    assert pool.acquire(1000) is big  # 1800 <= 2000
    assert pool.acquire(1000) is not tiny and pool.free_bytes == 100


def test_trim_frees_the_largest_buffers_first(pool):
    bufs = [pool.acquire(n) for n in (100, 200, 300, 400)]
    for buf in bufs:
        pool.release(buf)
    assert pool.trim(keep_bytes=600) == 400  # 1000 held: the 400 goes
    assert pool.free_bytes == 600
    assert pool.trim(keep_bytes=600) == 0
    assert pool.trim(keep_bytes=150) == 500  # 300 then 200
    assert pool.free_bytes == 100 and pool.acquire(100) is bufs[0]


def test_trim_keeps_the_buffer_about_to_be_reused(pool):
    bufs = [pool.acquire(n) for n in (100, 200, 300)]
    for buf in bufs:
        pool.release(buf)
    assert pool.trim(keep_bytes=0, protect_bytes=300) == 300  # 200 and 100 go, the 300 stays
    assert pool.free_bytes == 300
    assert pool.acquire(300) is bufs[2]
    pool.release(bufs[2])
    assert pool.trim(keep_bytes=0, protect_bytes=123) == 300  # no buffer of exactly that size: nothing kept
    assert pool.free_bytes == 0
    assert pool.trim(keep_bytes=0) == 0


def test_pool_is_safe_from_several_threads(pool):
    import threading

    errors = []

    def churn():
        try:
            for _ in range(200):
                buf = pool.acquire(4096)
                buf[0] = 1
                pool.release(buf)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert pool.num_allocated + pool.num_reused == 800
    assert pool.num_allocated <= 4 and pool.free_bytes == 4096 * pool.num_allocated


@pytest.mark.parametrize("mode, environ, expected", [
    ("always [madvise] never\n", {"A": "1"}, "glibc.malloc.hugetlb=1"),
    ("[always] madvise never\n", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ("always madvise [never]\n", {}, None),
    ("always [madvise] never\n", {"COE_HUGE_PAGES": "0"}, None),
    ("always [madvise] never\n", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, None),  # the user's choice
])
def test_huge_pages_are_asked_for_once_unless_off(tmp_path, mode, environ, expected):
    setting = tmp_path / "enabled"
    setting.write_text(mode)
    got = huge_page_environment(environ, setting)
    if expected is None:
        assert got is None
    else:
        assert got == {**environ, "GLIBC_TUNABLES": expected}
        assert huge_page_environment(got, setting) is None  # the re-executed process runs as it is


def test_no_huge_pages_where_the_kernel_setting_is_missing(tmp_path):
    assert huge_page_environment({}, tmp_path / "missing") is None
