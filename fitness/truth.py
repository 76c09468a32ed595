"""The truth key: what keeps a generated problem's truth out of a genome's reach.

A plug-in that generates its problems (``synthetic-pref``, ``pref-suite``, ``cls-suite``) draws
the true reward, the held-out prompts or the test split from a random generator. Seeded from
the evaluation seed alone, that truth is a public function of the seed and of the plug-in's
code: a genome that got past the static check could import the plug-in, rebuild its own
problem and train on the truth instead of on the preference pairs. So a problem's random
numbers come from :func:`draws`: with a key, a cryptographic stream (SHAKE-256) of a keyed hash
(BLAKE2b) of the evaluation seed and a random key that only trusted code reads; without one
(``public``), torch's generator seeded with the evaluation seed, as before.

* ``machine`` (the default): a key made once per user, ``$XDG_DATA_HOME/evoloss/truth.key``
  (``~/.local/share/evoloss/truth.key``), mode 0600. Runs copy it into their folder, so a run
  resumes and validates with its own key anywhere. The same seed scores the same on this
  machine; another machine draws other problems of the same family.
* ``public``: no key. A problem is a function of its seed alone, the same on every machine
  (the numbers in the documents), and an escaped genome could rebuild it.
* a path: a key file of your own (32 random bytes), e.g. one shared by a team.

Where the key is read: the engine names the key file in ``EVOLOSS_TRUTH_FILE``; the jail shows
that file to the warm worker read-only and covers it in every genome's process. The warm worker
itself never reads it: problems are built by :func:`build_secretly` in a short-lived child
process that reads the key, builds, sends the finished problem back and exits, so neither the
key nor anything derived from it but the problem is ever in the memory a genome's process is
forked with.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

#: Environment variable naming the key file (a path, not the key).
ENV = "EVOLOSS_TRUTH_FILE"
PUBLIC = "public"
MACHINE = "machine"
KEY_BYTES = 32
#: Name of a run folder's copy of its key.
RUN_KEY_NAME = "truth.key"

T = TypeVar("T")

_forks_genomes = False  # set in a warm worker: there only a builder child may read the key
_in_builder = False


class TruthKeyError(RuntimeError):
    """The truth key is missing, unreadable or read where it must not be."""


def machine_key_file(create: bool = True) -> Path:
    """This user's key file, made (32 random bytes, mode 0600) on first use when ``create``."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    path = base / "evoloss" / "truth.key"
    if create and not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_key(path, secrets.token_bytes(KEY_BYTES))
        except OSError as exc:
            raise TruthKeyError(f"cannot make this machine's truth key {path} ({exc.strerror}); pass --truth-key "
                                "FILE (a file of 32 random bytes) or --truth-key public") from None
    return path


def write_key(path: Path, key: bytes) -> None:
    """Write ``key`` to ``path`` readable by its owner only (atomically: never half a key)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(descriptor, key)
    finally:
        os.close(descriptor)
    try:
        os.link(temporary, path)  # never replaces a key another process made meanwhile
    except FileExistsError:
        pass
    finally:
        os.unlink(temporary)


def resolve(setting: str | None, run_dir: str | os.PathLike | None = None) -> Path | None:
    """The key file that ``setting`` (``machine``, ``public`` or a path) names; ``None`` for
    public problems. A run folder holding its own copy (:data:`RUN_KEY_NAME`) uses that copy
    unless the setting is ``public``.

    Raises:
        TruthKeyError: a named key file is missing or shorter than 16 bytes.
    """
    setting = (setting or MACHINE).strip()
    if setting == PUBLIC:
        return None
    if run_dir is not None and (Path(run_dir) / RUN_KEY_NAME).is_file():
        path = Path(run_dir) / RUN_KEY_NAME
    elif setting == MACHINE:
        path = machine_key_file()
    else:
        path = Path(setting).expanduser()
    path = path.resolve()
    _read_key(path)
    return path


def keep_in_run(path: Path | None, run_dir: str | os.PathLike) -> None:
    """Copy key file ``path`` into ``run_dir`` (mode 0600) unless the run has one already."""
    target = Path(run_dir) / RUN_KEY_NAME
    if path is not None and not target.exists() and path.resolve() != target.resolve():
        write_key(target, _read_key(path))


def key_id(path: Path | None) -> str:
    """A short name of the key that says which it is without revealing it (``public`` for none)."""
    if path is None:
        return PUBLIC
    return hashlib.blake2b(b"evoloss key id", key=_read_key(path), digest_size=6).hexdigest()


def use(path: Path | None) -> None:
    """Make ``path`` the key of this process and of the workers it starts (``None``: public)."""
    if path is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = str(path)


def key_file() -> Path | None:
    """The key file in effect (``None``: public problems)."""
    value = os.environ.get(ENV)
    return Path(value) if value else None


_builder_setup: Callable[[], Any] | None = None


def _enter_builder() -> None:
    global _in_builder
    _in_builder = True


def in_builder() -> bool:
    """Whether this process is :func:`build_secretly`'s child."""
    return _in_builder


def forking_genomes(builder_setup: Callable[[], Any] | None = None) -> None:
    """Called by a warm worker: from now on only :func:`build_secretly`'s child reads the key.
    ``builder_setup`` runs first thing in each such child."""
    global _forks_genomes, _builder_setup
    _forks_genomes, _builder_setup = True, builder_setup


def _read_key(path: Path) -> bytes:
    try:
        with open(path, "rb", buffering=0) as handle:
            key = handle.read(64)
    except OSError as exc:
        raise TruthKeyError(f"the truth key file {path} cannot be read ({exc.strerror}); pass --truth-key "
                            "public for problems drawn from the seed alone") from None
    if len(key) < 16:
        raise TruthKeyError(f"the truth key file {path} holds {len(key)} bytes, not a key (at least 16); "
                            "in a genome's process it is hidden")
    return key


def draws(public_seed: int) -> PublicDraws | KeyedDraws:
    """Where a problem's random numbers come from: :class:`PublicDraws` (a torch generator
    seeded with ``public_seed``, the numbers every machine draws) without a key, else
    :class:`KeyedDraws` for the key and ``public_seed``. Call it only inside a problem's
    construction (run through :func:`build_secretly`).

    Raises:
        TruthKeyError: in a warm worker outside :func:`build_secretly`, or the key is unreadable.
    """
    path = key_file()
    if path is None:
        return PublicDraws(int(public_seed))
    if _forks_genomes and not _in_builder:
        raise TruthKeyError("a keyed problem was asked for in the warm worker itself: build problems through "
                            "fitness.truth.build_secretly, so that no key enters its memory")
    return KeyedDraws(hashlib.blake2b(str(int(public_seed)).encode(), key=_read_key(path), digest_size=32,
                                      person=b"evoloss truth").digest())


def _shape(shape: tuple) -> tuple[int, ...]:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        return tuple(int(n) for n in shape[0])
    return tuple(int(n) for n in shape)


class PublicDraws:
    """Random numbers from a torch generator seeded with the public seed: calls named after
    torch's, in the same order, give exactly what those calls gave with that generator."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def randn(self, *shape: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, dtype=dtype)

    def rand(self, *shape: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator, dtype=dtype)

    def randint(self, *args: Any) -> torch.Tensor:
        """``randint(high, size)`` or ``randint(low, high, size)``, as torch's."""
        return torch.randint(*args, generator=self.generator)

    def randperm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator)


class KeyedDraws:
    """Random numbers from SHAKE-256 (a cryptographic stream) of a keyed digest and a call
    counter, with the methods of :class:`PublicDraws`.

    Not a torch generator: Mersenne Twister, which torch's CPU generator is, is linear, and
    about 20,000 bits of its output (the low bits of the pair indices a preference problem
    draws) give away its whole state, and so every number drawn before and after, the true
    reward included, whatever seeded it. No number drawn here tells anything of another.
    """

    def __init__(self, digest: bytes) -> None:
        self._digest = digest
        self._calls = 0

    def _words(self, count: int) -> np.ndarray:
        self._calls += 1
        stream = hashlib.shake_256(self._digest + self._calls.to_bytes(8, "little"))
        return np.frombuffer(stream.digest(8 * count), dtype=np.uint64)

    def _uniform(self, count: int, bits: int) -> np.ndarray:
        """``count`` numbers in [0, 1), multiples of 2**-bits (so that none rounds up to 1)."""
        return (self._words(count) >> np.uint64(64 - bits)).astype(np.float64) * 2.0 ** -bits

    def randn(self, *shape: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        size = _shape(shape)
        count = math.prod(size)
        uniform = self._uniform(2 * count, 53)
        radius = np.sqrt(-2.0 * np.log1p(-uniform[:count]))  # 1 - u is in (0, 1]
        normal = radius * np.cos(2.0 * math.pi * uniform[count:])  # Box-Muller
        return torch.from_numpy(normal).reshape(size).to(dtype or torch.get_default_dtype())

    def rand(self, *shape: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        size, dtype = _shape(shape), dtype or torch.get_default_dtype()
        bits = 53 if dtype == torch.float64 else 24
        return torch.from_numpy(self._uniform(math.prod(size), bits)).reshape(size).to(dtype)

    def randint(self, *args: Any) -> torch.Tensor:
        """``randint(high, size)`` or ``randint(low, high, size)``, as torch's (int64)."""
        low, high, size = (0, *args) if len(args) == 2 else args
        size = _shape((size,))
        span = np.uint64(int(high) - int(low))
        values = (self._words(math.prod(size)) % span).astype(np.int64) + int(low)  # bias below 2**-50
        return torch.from_numpy(values).reshape(size)

    def randperm(self, n: int) -> torch.Tensor:
        return torch.from_numpy(np.argsort(self._words(n), kind="stable").astype(np.int64))


#: What :func:`draws` returns.
Draws = PublicDraws | KeyedDraws


def build_secretly(make: Callable[..., T], *args: Any) -> T:
    """``make(*args)``, run where the truth key may be read: in a warm worker (whose memory every
    genome's process is forked with) with a key in effect, in a child process of its own that
    returns the result (pickled: it is trusted code that ran no genome) and exits, taking the
    key, the keyed digests and every temporary with it; elsewhere (the driver, a test, public
    problems, which are no secret), right here.

    Exceptions ``make`` raises are raised here (as :class:`RuntimeError` with their message if
    they cannot be pickled).
    """
    if not _forks_genomes or key_file() is None or _in_builder:  # public problems are no secret
        return make(*args)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the builder
        code = 1
        try:
            os.close(read_end)
            _enter_builder()
            if _builder_setup is not None:
                _builder_setup()
            try:
                payload = pickle.dumps((True, make(*args)), protocol=pickle.HIGHEST_PROTOCOL)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                try:
                    payload = pickle.dumps((False, exc))
                except Exception:  # noqa: BLE001 - an exception that does not pickle
                    payload = pickle.dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}")))
            view = memoryview(payload)
            while view:
                view = view[os.write(write_end, view):]
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    try:
        while chunk := os.read(read_end, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    del chunks
    if not data:
        raise RuntimeError(f"building the problem failed: its process ended with status {status} and no result")
    ok, value = pickle.loads(data)
    del data
    if not ok:
        raise value
    return value
