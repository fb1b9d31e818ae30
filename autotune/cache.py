"""The persistent tuning cache: one human-readable JSON file, safe with many writers.

Location, first that applies: the `path` argument; `$MAMBA3_TUNE_CACHE`;
`$XDG_CACHE_HOME/mamba3-kernels/tune.json`; `~/.cache/mamba3-kernels/tune.json`.

File layout (indented, keys sorted, so it diffs and greps well):

    {"format": "mamba3-kernels tuning cache", "version": 1, "updated": "<UTC time>",
     "entries": {"<key string>": {"key": {...}, "backend": "triton", "config": {...},
                                  "time_us": 4.1, "runners_up": [...], "failures": [...], ...}}}

Key = op, exact GPU name, compute capability, SM count, driver, versions of torch / triton /
tilelang / cutlass-dsl / this package, every field of the ScanSpec, and the shape bucket
(B and L rounded up to powers of two; H, G, N, P, R exact; see buckets.py). The key string is
made from the key dict, so an entry read back is re-keyed from its own "key" (hand edits of the
string are harmless).

Writes: under an exclusive `fcntl.flock` on `<file>.lock`, the file is re-read, the change
merged in, and the result written to a temporary file in the same folder and moved over the
old one with `os.replace`: readers (which take no lock) see the old or the new file, never a
torn one, and concurrent writers lose nothing. A corrupt file (not JSON, wrong layout) or a
stale one (another format version) gives a `CacheWarning`, is kept as
`<file>.corrupt-<time>-<pid>` and rebuilt empty; a malformed entry is dropped with a warning.
No cache problem ever raises out of `lookup`.

The device identity comes from torch.cuda (name, capability, SM count) and the NVIDIA driver
(/proc/driver/nvidia/version, else NVML, else the CUDA driver API version); tests inject
their own with `set_environment_provider`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import tempfile
import threading
import time
import warnings
from typing import Callable, Iterable, Optional

from . import buckets

FORMAT = "mamba3-kernels tuning cache"
VERSION = 1
ENV_VAR = "MAMBA3_TUNE_CACHE"
ENV_FIELDS = ("gpu", "cc", "sm_count", "driver", "torch", "triton", "tilelang", "cutlass_dsl",
              "mamba3_kernels")
KEY_FIELDS = ("op",) + ENV_FIELDS + ("spec", "shape")
DIST = {"torch": "torch", "triton": "triton", "tilelang": "tilelang",
        "cutlass_dsl": "nvidia-cutlass-dsl"}


class CacheWarning(UserWarning):
    """A tuning-cache problem that was worked around (corrupt file, failed write, ...)."""


def _warn(msg: str):
    warnings.warn(msg, CacheWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------
# the environment half of the key

@dataclasses.dataclass(frozen=True)
class Environment:
    gpu: str
    cc: str
    sm_count: int
    driver: str
    torch: str
    triton: str
    tilelang: str
    cutlass_dsl: str
    mamba3_kernels: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return (f"{self.gpu} (cc {self.cc}, {self.sm_count} SMs, driver {self.driver}); torch "
                f"{self.torch}, triton {self.triton}, tilelang {self.tilelang}, cutlass-dsl "
                f"{self.cutlass_dsl}, mamba3-kernels {self.mamba3_kernels}")


@functools.lru_cache(maxsize=None)
def software_versions() -> dict:
    """{torch, triton, tilelang, cutlass_dsl, mamba3_kernels}: installed versions, 'none' if absent.
    Read from package metadata: nothing is imported."""
    from importlib import metadata
    out = {}
    for field, dist in DIST.items():
        try:
            out[field] = metadata.version(dist)
        except Exception:
            out[field] = "none"
    try:
        from mamba3_kernels import __version__ as v
    except Exception:
        v = "unknown"
    out["mamba3_kernels"] = v
    return out


@functools.lru_cache(maxsize=None)
def driver_version() -> str:
    """The NVIDIA driver version, e.g. '550.54.15' ('cuda-driver-api 12040' as a last resort)."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Module(?:\s+for\s+\S+)?\s+(\d+(?:\.\d+)+)", f.read())
        if m:
            return m.group(1)
    except OSError:
        pass
    try:
        import pynvml  # type: ignore
        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        pass
    try:
        import torch
        return f"cuda-driver-api {torch._C._cuda_getDriverVersion()}"
    except Exception:
        return "unknown"


_env_provider: Optional[Callable] = None
_env_memo: dict = {}


def set_environment_provider(fn: Optional[Callable]) -> None:
    """Replace how the environment is found: fn(device) -> Environment | None (None: no GPU).
    Pass None to restore the torch.cuda one. For tests and offline tools."""
    global _env_provider
    _env_provider = fn
    _env_memo.clear()


def _cuda_index(device):
    """The CUDA device index of `device` (None, int, str or torch.device); None if not CUDA."""
    import torch
    if not torch.cuda.is_available():
        return None
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    d = torch.device(device)
    if d.type != "cuda":
        return None
    return d.index if d.index is not None else torch.cuda.current_device()


def current_environment(device=None) -> Optional[Environment]:
    """The Environment of `device` (default: the current CUDA device); None without a CUDA GPU.
    Memoised per device index (the driver and versions are read once per process)."""
    if _env_provider is not None:
        return _env_provider(device)
    if isinstance(device, Environment):
        return device
    idx = _cuda_index(device)
    if idx is None:
        return None
    env = _env_memo.get(idx)
    if env is None:
        import torch
        p = torch.cuda.get_device_properties(idx)
        env = Environment(gpu=p.name, cc=f"{p.major}.{p.minor}", sm_count=int(p.multi_processor_count),
                          driver=driver_version(), **software_versions())
        _env_memo[idx] = env
    return env


# ----------------------------------------------------------------------------------------
# keys

def spec_dict(spec) -> dict:
    """Every field of a (flat, frozen) ScanSpec; memoised per spec."""
    return dict(_spec_items(spec))


@functools.lru_cache(maxsize=1024)
def _spec_items(spec) -> tuple:
    return tuple((f.name, getattr(spec, f.name)) for f in dataclasses.fields(spec))


def spec_str(spec: dict) -> str:
    """Every field as name=value, sorted by name (the file is written with sorted keys)."""
    return ",".join(f"{k}={spec[k]}" for k in sorted(spec))


def make_key(op: str, spec, problem, env: Environment) -> dict:
    """The key dict of (op, spec, problem) on `env`: KEY_FIELDS, shape bucketed."""
    if not isinstance(op, str):
        raise ValueError(f"op: expected a str such as 'step', got {op!r}")
    k = {"op": op}
    k.update(env.as_dict())
    k["spec"] = spec_dict(spec)
    k["shape"] = buckets.shape_bucket(spec, problem)
    return k


def _env_str(k: dict) -> str:
    return (f"{k['op']} | {k['gpu']} | cc {k['cc']} | {k['sm_count']} SMs | driver {k['driver']} | "
            f"torch {k['torch']} triton {k['triton']} tilelang {k['tilelang']} "
            f"cutlass-dsl {k['cutlass_dsl']} mamba3-kernels {k['mamba3_kernels']} | {spec_str(k['spec'])}")


def prefix_string(key: dict) -> str:
    """The key string without the bucketed B and L (what a nearest-bucket hit must match)."""
    s = key["shape"]
    rest = " ".join(f"{f}={s[f]}" for f in buckets.SHAPE_FIELDS if f not in buckets.BUCKETED)
    return f"{_env_str(key)} | {rest}"


def key_string(key: dict) -> str:
    """'step | NVIDIA H100 ... | cc 9.0 | 132 SMs | driver ... | torch ... | d_state=...,... | B=8 L=1 H=...'"""
    return f"{_env_str(key)} | {buckets.shape_str(key['shape'])}"


def _check_entry(e) -> Optional[str]:
    """None if `e` is a well-formed entry, else what is wrong."""
    if not isinstance(e, dict):
        return "not an object"
    k = e.get("key")
    if not isinstance(k, dict):
        return "no 'key' object"
    missing = [f for f in KEY_FIELDS if f not in k]
    if missing:
        return f"key lacks {missing}"
    if not isinstance(k["spec"], dict) or not isinstance(k["shape"], dict):
        return "key.spec / key.shape not objects"
    if any(not isinstance(k["shape"].get(f), int) for f in buckets.SHAPE_FIELDS):
        return f"key.shape lacks integer {list(buckets.SHAPE_FIELDS)}"
    if not isinstance(e.get("backend"), str) or not isinstance(e.get("config"), dict):
        return "no 'backend' string or 'config' object"
    return None


def canonical_config(cfg) -> str:
    """A config as canonical JSON (tuples and lists compare equal)."""
    return json.dumps(cfg, sort_keys=True, default=str)


def default_path() -> str:
    p = os.environ.get(ENV_VAR)
    if p:
        return os.path.abspath(os.path.expanduser(p))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.abspath(os.path.join(base, "mamba3-kernels", "tune.json"))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


try:
    import fcntl
except ImportError:  # not POSIX: writes are still atomic, but concurrent writers may race
    fcntl = None


# ----------------------------------------------------------------------------------------
# the cache file

class Cache:
    """One cache file. Reads are memoised on the file's (mtime, size, inode); every write is a
    locked read-merge-write. Thread- and process-safe."""

    def __init__(self, path: Optional[str] = None):
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"cache: expected a path (str) or a Cache, got {type(path).__name__}")
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path))) if path is not None else default_path()
        self._sig = None
        self._entries: dict = {}
        self._index: dict = {}
        self._tlock = threading.RLock()

    def __repr__(self):
        return f"Cache({self.path!r})"

    # -- reading ---------------------------------------------------------------------------
    def _stat_sig(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _parse(self, text: str):
        """(entries, problem): entries re-keyed and well-formed; problem is None, or why the
        whole file is unusable (then entries is {})."""
        try:
            data = json.loads(text)
        except ValueError as e:
            return {}, f"not valid JSON ({e})"
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            return {}, f"not a {FORMAT!r} file"
        if data.get("version") != VERSION:
            return {}, f"stale: format version {data.get('version')!r}, this package uses {VERSION}"
        entries, bad = {}, []
        for ks, e in data["entries"].items():
            why = _check_entry(e)
            if why:
                bad.append(f"{ks[:60]!r}: {why}")
                continue
            entries[key_string(e["key"])] = e
        if bad:
            _warn(f"tuning cache {self.path}: dropped {len(bad)} malformed entr{'y' if len(bad) == 1 else 'ies'} "
                  f"({'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})")
        return entries, None

    def _read_disk(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return {}, None
        except (OSError, UnicodeDecodeError) as e:
            return {}, f"unreadable ({type(e).__name__}: {e})"
        return self._parse(text)

    def _set(self, entries: dict, sig):
        index: dict = {}
        for ks, e in entries.items():
            index.setdefault(prefix_string(e["key"]), []).append((e["key"]["shape"], ks))
        self._entries, self._index, self._sig = entries, index, sig

    def load(self) -> dict:
        """The entries {key string: entry} (memoised; re-read when the file changed). A corrupt
        or stale file is warned about, backed up and rebuilt."""
        with self._tlock:
            sig = self._stat_sig()
            if sig == self._sig:
                return self._entries
            entries, problem = self._read_disk()
            if problem:
                try:  # re-checked under the lock: another process may have rebuilt it already
                    return self._update(None)
                except OSError as e:
                    _warn(f"tuning cache {self.path} is {problem} and could not be rebuilt ({e}); "
                          "using no cached entries")
                    entries = {}
            self._set(entries, sig)
            return self._entries

    def entries(self) -> dict:
        return dict(self.load())

    def __len__(self):
        return len(self.load())

    def get(self, key) -> Optional[dict]:
        """The entry for a key dict or key string, or None."""
        ks = key if isinstance(key, str) else key_string(key)
        return self.load().get(ks)

    def find(self, key: dict, accept: Optional[Callable[[dict], bool]] = None, nearest: bool = True):
        """(entry, "cache") for the exact bucket, else (entry, "nearest-bucket") for the nearest
        bucket with the same everything else (if `nearest`), else (None, None). `accept(entry)`
        may veto entries (e.g. a config no longer in the backend's space); the next nearest is
        tried."""
        entries = self.load()
        e = entries.get(key_string(key))
        if e is not None and (accept is None or accept(e)):
            return e, "cache"
        if not nearest:
            return None, None
        pool = [(s, ks) for s, ks in self._index.get(prefix_string(key), ())
                if s != key["shape"]]
        target = key["shape"]
        pool.sort(key=lambda sk: buckets.distance(target, sk[0]) + (buckets.shape_str(sk[0]),))
        for s, ks in pool:
            e = entries.get(ks)
            if e is not None and (accept is None or accept(e)):
                return e, "nearest-bucket"
        return None, None

    # -- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        d = os.path.dirname(self.path)
        os.makedirs(d, exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _write(self, entries: dict):
        d = os.path.dirname(self.path)
        data = {"format": FORMAT, "version": VERSION, "updated": _now(), "entries": entries}
        fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(self.path) + ".", suffix=".tmp")
        try:
            with contextlib.suppress(OSError):
                os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a shared cache must stay readable
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True, default=str)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
                st = os.fstat(f.fileno())
            os.replace(tmp, self.path)
            return (st.st_mtime_ns, st.st_size, st.st_ino)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _update(self, change: Optional[Callable[[dict], None]]) -> dict:
        """Locked read-merge-write; `change(entries)` edits the fresh entries in place. A corrupt
        file found here is backed up and replaced. Returns the entries written."""
        with self._tlock, self._locked():
            entries, problem = self._read_disk()
            if problem:
                backup = f"{self.path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
                try:
                    os.replace(self.path, backup)
                    where = f"kept as {backup}"
                except OSError as e:
                    where = f"no backup kept ({e})"
            if change is not None:
                change(entries)
            if change is not None or problem or not os.path.exists(self.path):
                sig = self._write(entries)
            else:
                sig = self._stat_sig()
            if problem:
                _warn(f"tuning cache {self.path} was {problem}: {where}; rebuilt")
            self._set(entries, sig)
        if change is not None:  # this process's memoised dispatch decisions may be stale now
            from mamba3_kernels import dispatch
            dispatch.clear_memo()
        return entries

    def put(self, entry: dict) -> str:
        """Add or replace one entry (its "key" dict decides where). Returns its key string."""
        return self.put_many([entry])[0]

    def put_many(self, entries: Iterable[dict]) -> list:
        """Add or replace entries in one locked write. Returns their key strings."""
        entries = list(entries)
        for e in entries:
            why = _check_entry(e)
            if why:
                raise ValueError(f"entry: expected a well-formed cache entry, got one with {why}")
        keys = [key_string(e["key"]) for e in entries]

        def change(cur):
            for ks, e in zip(keys, entries):
                cur[ks] = e
        self._update(change)
        return keys

    def remove(self, match: Callable[[dict], bool]) -> int:
        """Delete the entries for which match(entry) is true. Returns how many."""
        n = [0]

        def change(cur):
            for ks in [ks for ks, e in cur.items() if match(e)]:
                del cur[ks]
                n[0] += 1
        self._update(change)
        return n[0]

    def clear(self) -> int:
        return self.remove(lambda e: True)

    def prune_stale(self, env: Environment) -> int:
        """Delete entries of this GPU (name, cc, SMs) whose driver or versions differ from env's."""
        cur = env.as_dict()
        same_gpu = ("gpu", "cc", "sm_count")
        return self.remove(lambda e: all(e["key"][f] == cur[f] for f in same_gpu)
                           and any(e["key"][f] != cur[f] for f in ENV_FIELDS if f not in same_gpu))

    # -- export / import -------------------------------------------------------------------
    def export(self, path: str, match: Optional[Callable[[dict], bool]] = None) -> int:
        """Write the entries (all, or those with match(entry)) to a standalone cache file at
        `path` (same format, atomic). Returns how many."""
        sel = {ks: e for ks, e in self.load().items() if match is None or match(e)}
        Cache(path)._update(lambda cur: (cur.clear(), cur.update(sel)))
        return len(sel)

    def import_entries(self, path: str, overwrite: bool = True) -> int:
        """Merge the entries of the cache file at `path` into this one (same key: replaced unless
        overwrite=False). A corrupt source raises ValueError naming it. Returns how many were merged."""
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"path: expected a readable tuning-cache file, got {path!r} ({e})") from None
        src, problem = self._parse(text)
        if problem:
            raise ValueError(f"path: expected a {FORMAT!r} file (version {VERSION}), got {path!r}: {problem}")
        n = [0]

        def change(cur):
            for ks, e in src.items():
                if overwrite or ks not in cur:
                    cur[ks] = e
                    n[0] += 1
        self._update(change)
        return n[0]


Cache.import_ = Cache.import_entries   # `import` is a keyword: both names work


_caches: dict = {}
_caches_lock = threading.Lock()


def get_cache(cache=None) -> Cache:
    """A Cache from None (the default path, $MAMBA3_TUNE_CACHE honoured), a path, or a Cache.
    One object per path per process, so its memo serves every lookup."""
    if isinstance(cache, Cache):
        return cache
    path = default_path() if cache is None else os.path.abspath(os.path.expanduser(os.fspath(cache)))
    with _caches_lock:
        c = _caches.get(path)
        if c is None:
            c = _caches[path] = Cache(path)
        return c


# ----------------------------------------------------------------------------------------
# the dispatch hook

def _config_in_space(op, spec, problem):
    def accept(entry) -> bool:
        try:
            from mamba3_kernels import backends
            mod = backends.get(entry["backend"])
            want = canonical_config(entry["config"])
            return any(canonical_config(c) == want for c in mod.space(spec, problem, op))
        except Exception:
            return False
    return accept


def lookup(op: str, spec, problem, device=None, *, cache=None, env: Optional[Environment] = None,
           validate: bool = True, nearest: bool = True):
    """(backend name, config dict, source) from the tuning cache, or None.

    source is "cache" (this shape bucket) or "nearest-bucket" (only if `nearest`). `device`: a
    CUDA device (default the current one); with no GPU and no injected environment there is
    nothing to look up. `validate`: accept an entry only if its config is still in the
    backend's space for this problem (else the next nearest bucket is tried). Never raises:
    problems become CacheWarnings.
    """
    try:
        env = env if env is not None else current_environment(device)
        if env is None:
            return None
        key = make_key(op, spec, problem, env)
        e, source = get_cache(cache).find(key, _config_in_space(op, spec, problem) if validate else None,
                                          nearest=nearest)
        if e is None:
            return None
        return e["backend"], dict(e["config"]), source
    except Exception as ex:  # a cache must never break a call
        _warn(f"tuning cache lookup failed ({type(ex).__name__}: {ex}); using the default choice")
        return None
