"""Measuring and reusing memory: footprints come from the operating system, not from file sizes.

- ``anon_rss_bytes``: the process's anonymous resident memory (Linux ``RssAnon``), so a load's
  footprint is the delta around it.
- ``resident_file_bytes``: how many bytes of a file are in the page cache right now (``mincore``).
- ``read_sequential``: read a file front to back into memory that already exists, at disk speed.
- ``HostBufferPool``: host allocations kept after an expert leaves the host tier and handed to
  the next one, because filling fresh memory page-faults at a fraction of copy bandwidth.
- ``huge_page_environment``: the environment in which glibc's malloc asks for transparent huge
  pages, so the fresh buffers that are not pooled (llama.cpp's KV cache and compute buffers)
  fault 2 MB at a time instead of 4 KB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading
from pathlib import Path

READ_CHUNK_BYTES = 32 * 2**20
PAGE_BYTES = mmap.PAGESIZE
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# glibc >= 2.35: madvise(MADV_HUGEPAGE) on malloc'd memory
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def anon_rss_bytes() -> int | None:
    """Anonymous resident memory of this process, or None where /proc is not available."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def process_rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (its VmRSS), 0 when it is gone or /proc is missing."""
    return process_status_bytes(pid, "VmRSS")


def process_status_bytes(pid: int, field: str) -> int:
    """A memory line of process ``pid``'s /proc status (VmRSS, RssAnon, ...) in bytes, 0 when it
    is gone or /proc is missing."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_libc = None
_PROT_READ, _MAP_SHARED = 0x1, 0x01


def _libc_functions():
    """libc's mmap/mincore/munmap with argument types, or None (not Linux/BSD-like)."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        lib = ctypes.CDLL(name, use_errno=True) if name else None
        if lib is None or not all(hasattr(lib, f) for f in ("mmap", "mincore", "munmap")):
            _libc = False
        else:
            lib.mmap.restype = ctypes.c_void_p
            lib.mmap.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_long,
            ]
            lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _libc = lib
    return _libc or None


def resident_file_bytes(path: Path) -> int | None:
    """Bytes of ``path`` held in the page cache right now (``mincore`` over a read-only map), or
    None where that cannot be asked."""
    lib = _libc_functions()
    size = path.stat().st_size
    if lib is None:
        return None
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        address = lib.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            num_pages = (size + PAGE_BYTES - 1) // PAGE_BYTES
            vec = (ctypes.c_ubyte * num_pages)()
            if lib.mincore(address, size, vec) != 0:
                return None
            return min(size, sum(v & 1 for v in bytes(vec)) * PAGE_BYTES)
        finally:
            lib.munmap(address, size)
    finally:
        os.close(fd)


_MADV_POPULATE_WRITE = 23  # Linux


def _populate(address: int, num_bytes: int) -> None:
    """Fault pages in for writing without changing their contents (Linux 5.14+; else a no-op)."""
    lib = _libc_functions()
    start = address // PAGE_BYTES * PAGE_BYTES
    if lib is not None:
        lib.madvise(start, address + num_bytes - start, _MADV_POPULATE_WRITE)


def drop_file_cache(path: Path) -> bool:
    """Ask the kernel to drop a file's clean pages from the page cache (no privileges needed for
    files we can open). Returns whether the file is out of the cache afterwards."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    resident = resident_file_bytes(path)
    return resident is not None and resident < PAGE_BYTES * 16


def read_sequential(path: Path, into: memoryview | None = None) -> int:
    """Read ``path`` front to back with large reads; into ``into`` (existing memory, at least the
    file's size) or through one reusable chunk when only the page cache should be filled.
    Returns the bytes read."""
    size = path.stat().st_size
    with path.open("rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        if into is not None:
            return _read_into(f, into[:size])
        chunk = memoryview(bytearray(min(READ_CHUNK_BYTES, max(size, 1))))
        total = 0
        while n := f.readinto(chunk):
            total += n
        return total


def _read_into(f, target: memoryview) -> int:
    """Read into ``target`` while a helper thread faults in the pages ahead of the reads: page
    faults of fresh memory interleaved with the reads would halve the disk's bandwidth."""
    prefault = None
    if not target.readonly and len(target) > 4 * READ_CHUNK_BYTES:
        address = ctypes.addressof(ctypes.c_char.from_buffer(target))
        prefault = threading.Thread(
            target=_populate_chunks, args=(address, len(target)), daemon=True
        )
        prefault.start()
    try:
        return _read_chunks(f, target)
    finally:
        if prefault is not None:
            prefault.join()


def _populate_chunks(address: int, num_bytes: int) -> None:
    for offset in range(0, num_bytes, READ_CHUNK_BYTES):
        _populate(address + offset, min(READ_CHUNK_BYTES, num_bytes - offset))


def _read_chunks(f, target: memoryview) -> int:
    done = 0
    while done < len(target):
        n = f.readinto(target[done : done + READ_CHUNK_BYTES])
        if not n:
            raise OSError(f"{f.name}: file ended after {done} of {len(target)} bytes")
        done += n
    return done


class HostBufferPool:
    """Reusable host allocations (torch uint8 tensors, pinned when ``pin`` is set).

    Contract: ``acquire``/``release``/``trim`` are safe from any thread. A released buffer is
    handed to the next ``acquire`` that fits in it; ``free_bytes`` is what the pool holds unused.
    """

    def __init__(self, pin: bool = False):
        self.pin = pin
        self._free: list = []
        self._lock = threading.Lock()
        self.num_reused = 0
        self.num_allocated = 0

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(buf.numel() for buf in self._free)

    def _best_fit(self, num_bytes: int):
        """The smallest free buffer that holds ``num_bytes`` without wasting more than as much again."""
        fitting = [buf for buf in self._free if num_bytes <= buf.numel() <= 2 * max(num_bytes, 1)]
        return min(fitting, key=lambda buf: buf.numel()) if fitting else None

    def fitting_bytes(self, num_bytes: int) -> int:
        """Size of the buffer ``acquire(num_bytes)`` would reuse, or 0 when it would allocate."""
        with self._lock:
            best = self._best_fit(num_bytes)
            return 0 if best is None else best.numel()

    def acquire(self, num_bytes: int):
        """A uint8 tensor of at least ``num_bytes``: a free one that fits, else a new allocation."""
        with self._lock:
            best = self._best_fit(num_bytes)
            if best is not None:
                # by identity: list.remove compares with ==, which for tensors is elementwise
                self._free = [buf for buf in self._free if buf is not best]
                self.num_reused += 1
                return best
            self.num_allocated += 1
        import torch

        return torch.empty(num_bytes, dtype=torch.uint8, pin_memory=self.pin)

    def release(self, buffer) -> None:
        with self._lock:
            self._free.append(buffer)

    def trim(self, keep_bytes: int, protect_bytes: int = 0) -> int:
        """Free unused buffers, largest first, until at most ``keep_bytes`` are held; one buffer of
        exactly ``protect_bytes`` (about to be reused) is kept. Returns the bytes freed."""
        freed = 0
        with self._lock:
            protected = next(
                (buf for buf in self._free if protect_bytes and buf.numel() == protect_bytes), None
            )
            others = sorted(
                (buf for buf in self._free if buf is not protected), key=lambda buf: buf.numel()
            )
            held = sum(buf.numel() for buf in self._free)
            while others and held > keep_bytes:
                buf = others.pop()
                held -= buf.numel()
                freed += buf.numel()
            self._free = others + ([protected] if protected is not None else [])
        return freed


def huge_page_environment(
    environ: dict[str, str], thp_setting: Path = THP_SETTING
) -> dict[str, str] | None:
    """``environ`` plus the glibc tunable that makes malloc ask for transparent huge pages, or
    None when there is nothing to change: already set, turned off (``COE_HUGE_PAGES=0``), not
    glibc, or transparent huge pages disabled. Tunables are read at process start, so the caller
    re-executes itself in the returned environment."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get("COE_HUGE_PAGES") == "0" or "glibc.malloc.hugetlb" in tunables:
        return None
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
    except (ValueError, OSError, AttributeError):  # not glibc, or no confstr on this platform
        return None
    try:
        mode = thp_setting.read_text()
    except OSError:
        return None
    if "[never]" in mode or "[" not in mode:
        return None
    return {
        **environ,
        "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE,
    }
