"""AdapterResolver: a client's lora_id (a name, never a path) -> LoRARequest.

Lookup order: the registry file (`multi_lora.json`, Triton vllm_backend format:
name -> local directory, or name -> {"hub": "org/repo", "revision": "..."}),
then `<root>/<name>` in each adapter root. Names are never cached negatively, so
new adapters are served without a restart; the registry is re-read when its
mtime, size or inode changes. An adapter's int id is its version: derived from a
fingerprint of its files (name, real directory, and for adapter_config.json and
every *.safetensors its name, size, mtime_ns, inode, device and ctime_ns), so
changed files get a new id and the engine never serves a stale cached copy nor
a remembered failure of an older version. The inode and ctime catch what size
and mtime miss: a same-size file renamed into place with its mtime preserved
(`cp -p`, `rsync -t`), or rewritten in place and `touch`ed back (which sets
ctime). Replace adapters atomically (write elsewhere, then rename) so a
half-copied directory is never fingerprinted.

Error messages show only the name the client sent; filesystem paths go to the
log, for the operator.
"""

import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from multilora.errors import AdapterFormatError, AdapterNameError, AdapterNotFoundError
from multilora.lora.request import LoRARequest

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
HUB_ALLOW_PATTERNS = [ADAPTER_CONFIG, "*.safetensors"]
MAX_NAME_LEN = 128
_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")
_NAME_HINT = f"use 1-{MAX_NAME_LEN} letters, digits, '.', '_' or '-'"


@dataclass(frozen=True)
class _HubEntry:
    repo: str
    revision: str


# A registry entry: an absolute local directory, or a pinned hub snapshot.
_Entry = str | _HubEntry


def _is_plain_name(name: str) -> bool:
    return (0 < len(name) <= MAX_NAME_LEN and name not in (".", "..")
            and _PLAIN_NAME.fullmatch(name) is not None)


def _is_hub_style_name(name: str) -> bool:
    """`org/repo`: two plain names joined by one '/' (allowed only as registry keys)."""
    parts = name.split("/")
    return len(name) <= MAX_NAME_LEN and len(parts) == 2 and all(map(_is_plain_name, parts))


def _shown(name: str) -> str:
    """The client's name for an error message, cut short so a huge lora_id cannot flood logs."""
    return repr(name if len(name) <= 64 else name[:64] + "...")


def _inside(path: str, real_root: str) -> bool:
    return path != real_root and os.path.commonpath([path, real_root]) == real_root


def _parse_registry(text: str, base_dir: str) -> dict[str, _Entry]:
    """Validate a multi_lora.json document; raises AdapterFormatError naming the bad entry."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"multi_lora.json is not valid JSON ({e})") from None
    except (ValueError, RecursionError) as e:   # a number of too many digits; nesting too deep
        raise AdapterFormatError(f"multi_lora.json is not usable JSON ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise AdapterFormatError("multi_lora.json must be a JSON object: adapter name -> directory")
    return {name: _parse_entry(name, value, base_dir) for name, value in raw.items()}


def _parse_entry(name: str, value, base_dir: str) -> _Entry:
    if not (_is_plain_name(name) or _is_hub_style_name(name)):
        raise AdapterFormatError(f"multi_lora.json: {_shown(name)} is not a valid adapter name; {_NAME_HINT}")
    if isinstance(value, str) and value:
        return os.path.join(base_dir, value)  # an absolute value replaces base_dir
    if isinstance(value, dict):
        unknown = set(value) - {"hub", "revision"}
        if unknown:
            raise AdapterFormatError(f"multi_lora.json: entry {_shown(name)} has unknown keys {sorted(unknown)}")
        repo, revision = value.get("hub"), value.get("revision")
        if not (isinstance(repo, str) and repo):
            raise AdapterFormatError(f"multi_lora.json: entry {_shown(name)} needs \"hub\": \"org/repo\"")
        if not (isinstance(revision, str) and revision):
            raise AdapterFormatError(
                f"multi_lora.json: hub entry {_shown(name)} needs a \"revision\" (a commit hash or tag) "
                "so that the adapter cannot change under the same name")
        return _HubEntry(repo, revision)
    raise AdapterFormatError(
        f"multi_lora.json: entry {_shown(name)} must be a directory string or {{\"hub\": ..., \"revision\": ...}}")


class AdapterResolver:
    """Turns adapter names into `LoRARequest`s; safe to call from many threads.

    `roots`: directories whose subdirectories (with adapter_config.json) are
    adapters. `registry_path`: optional `multi_lora.json`; relative directories
    in it are relative to the file. `hub_cache_dir`: where hub entries are
    downloaded (default: the huggingface_hub cache).
    """

    def __init__(self, roots: Sequence[str | os.PathLike] = (), registry_path: str | os.PathLike | None = None,
                 hub_cache_dir: str | os.PathLike | None = None):
        self._roots = [(os.fspath(r), os.path.realpath(r)) for r in roots]
        for root, _ in self._roots:
            if not os.path.isdir(root):
                logger.warning("adapter root %s is not a directory (yet); adapters there are not served", root)
        self._registry_path = os.path.abspath(registry_path) if registry_path is not None else None
        self._hub_cache_dir = os.fspath(hub_cache_dir) if hub_cache_dir is not None else None
        self._lock = threading.Lock()      # guards the registry and the ids
        self._hub_lock = threading.Lock()  # guards the hub path cache; a slow download blocks no local adapter
        self._registry: dict[str, _Entry] = {}
        self._registry_sig: tuple | None = None
        self._ids: dict[tuple, int] = {}
        self._latest_id: dict[str, int] = {}
        self._next_id = 1
        self._hub_paths: dict[_HubEntry, str] = {}
        if self._registry_path is not None:
            with self._lock:
                self._load_registry(self._registry_signature(), strict=True)

    # ---- public API -------------------------------------------------------

    def resolve(self, adapter_name: str) -> LoRARequest:
        """The request for `adapter_name`, with an id that changes exactly when its files do.

        Raises AdapterNameError (not a plain name, or an adapter leaving its
        root), AdapterNotFoundError (no such adapter), AdapterFormatError
        (listed or found, but without a readable adapter_config.json).
        """
        registry = self._check_name(adapter_name)
        entry = registry.get(adapter_name)
        if entry is not None:
            real_dir, real_root = self._registry_dir(adapter_name, entry), None
        else:
            real_dir, real_root = self._find_in_roots(adapter_name)
        fingerprint = self._fingerprint(adapter_name, real_dir, real_root)
        return LoRARequest(adapter_name, self._id_for(fingerprint), real_dir)

    def list_adapters(self) -> list[str]:
        """Names servable now: registry keys plus adapter subdirectories of the roots."""
        names = set(self._current_registry())
        for root, real_root in self._roots:
            try:
                entries = os.listdir(root)
            except OSError:
                continue
            for name in entries:
                path = os.path.join(root, name)
                if (_is_plain_name(name) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))
                        and _inside(os.path.realpath(path), real_root)):
                    names.add(name)
        return sorted(names)

    # ---- names and lookup -------------------------------------------------

    def _check_name(self, name: str) -> dict[str, _Entry]:
        """Refuse anything but a plain name (or a registry key); returns the current registry."""
        if not isinstance(name, str):
            raise AdapterNameError(f"lora_id must be a string, got {type(name).__name__}")
        registry = self._current_registry()
        if _is_plain_name(name) or (name in registry and _is_hub_style_name(name)):
            return registry
        logger.info("refused lora_id %s: not a plain adapter name", _shown(name))
        hint = _NAME_HINT if "/" not in name else f"{_NAME_HINT}; 'org/name' only for names listed in the registry"
        raise AdapterNameError(f"lora_id {_shown(name)} is not a valid adapter name: {hint}")

    def _find_in_roots(self, name: str) -> tuple[str, str]:
        for root, real_root in self._roots:
            candidate = os.path.join(root, name)
            if not os.path.isfile(os.path.join(candidate, ADAPTER_CONFIG)):
                continue
            real_dir = os.path.realpath(candidate)
            if not _inside(real_dir, real_root):
                self._refuse_escape(name, candidate, real_dir)
            return real_dir, real_root
        raise AdapterNotFoundError(f"unknown adapter {_shown(name)}; check lora_id, or ask the operator to add it")

    def _refuse_escape(self, name: str, path: str, target: str):
        logger.warning("refused adapter %s: %s resolves to %s, outside its adapter root", _shown(name), path, target)
        raise AdapterNameError(f"adapter {_shown(name)} is refused: it leaves the adapter root; "
                               "ask the operator to replace the symlink with the adapter files")

    def _registry_dir(self, name: str, entry: _Entry) -> str:
        path = self._hub_snapshot(name, entry) if isinstance(entry, _HubEntry) else entry
        if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
            logger.warning("registry adapter %s: no %s in %s", _shown(name), ADAPTER_CONFIG, path)
            raise AdapterFormatError(f"adapter {_shown(name)} is listed in the registry but has no "
                                     f"{ADAPTER_CONFIG}; ask the operator to fix its entry")
        return os.path.realpath(path)

    def _hub_snapshot(self, name: str, entry: _HubEntry) -> str:
        """Download a pinned hub adapter once; later calls reuse the local snapshot."""
        with self._hub_lock:
            path = self._hub_paths.get(entry)
            if path is not None and os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
                return path
            import huggingface_hub  # only servers with hub entries need it

            logger.info("downloading adapter %s from hub repo %s@%s", _shown(name), entry.repo, entry.revision)
            try:
                path = huggingface_hub.snapshot_download(
                    repo_id=entry.repo, revision=entry.revision,
                    allow_patterns=HUB_ALLOW_PATTERNS, cache_dir=self._hub_cache_dir)
            except Exception as e:  # network, auth, unknown repo/revision: all mean "cannot serve it"
                logger.warning("download of adapter %s (%s@%s) failed: %s", _shown(name), entry.repo, entry.revision, e)
                raise AdapterNotFoundError(f"adapter {_shown(name)} could not be downloaded; "
                                           "ask the operator to check its registry entry") from None
            self._hub_paths[entry] = path
            return path

    # ---- versions -----------------------------------------------------------

    def _fingerprint(self, name: str, real_dir: str, real_root: str | None) -> tuple:
        """(name, dir, sorted (file, size, mtime, inode, device, ctime)) from stat calls only; checks file
        symlinks stay in root."""
        files = []
        try:
            with os.scandir(real_dir) as entries:
                for entry in entries:
                    if entry.name != ADAPTER_CONFIG and not entry.name.endswith(".safetensors"):
                        continue
                    if real_root is not None and entry.is_symlink():
                        target = os.path.realpath(entry.path)
                        if not _inside(target, real_root):
                            self._refuse_escape(name, entry.path, target)
                    st = entry.stat()
                    files.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns))
        except OSError as e:
            logger.warning("adapter %s: cannot stat files in %s: %s", _shown(name), real_dir, e)
            raise AdapterFormatError(f"adapter {_shown(name)} cannot be read (it may be being replaced); "
                                     "retry, or ask the operator to check it") from None
        return (name, real_dir, tuple(sorted(files)))

    def _id_for(self, fingerprint: tuple) -> int:
        with self._lock:
            adapter_id = self._ids.get(fingerprint)
            if adapter_id is None:
                adapter_id = self._ids[fingerprint] = self._next_id
                self._next_id += 1
                name = fingerprint[0]
                previous = self._latest_id.get(name)
                if previous is not None:
                    logger.info("adapter %s changed: now id %d (was %d)", _shown(name), adapter_id, previous)
            self._latest_id[fingerprint[0]] = adapter_id
            return adapter_id

    # ---- registry -----------------------------------------------------------

    def _registry_signature(self) -> tuple | None:
        try:
            st = os.stat(self._registry_path)
        except FileNotFoundError:
            return None
        # The inode catches an atomic replace (rename) that kept mtime and size, e.g. `cp -p` + `mv`.
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _current_registry(self) -> dict[str, _Entry]:
        if self._registry_path is None:
            return {}
        signature = self._registry_signature()
        with self._lock:
            if signature != self._registry_sig:
                self._load_registry(signature, strict=False)
            return self._registry

    def _load_registry(self, signature: tuple | None, strict: bool):
        """Re-read the registry (lock held). At start-up a bad file raises; later the old one stays."""
        self._registry_sig = signature
        if signature is None:
            logger.warning("adapter registry %s does not exist; serving no registry adapters", self._registry_path)
            self._registry = {}
            return
        try:
            with open(self._registry_path, encoding="utf-8") as f:
                text = f.read()
            registry = _parse_registry(text, os.path.dirname(self._registry_path))
        except (OSError, UnicodeDecodeError, AdapterFormatError) as e:
            if strict:
                logger.error("adapter registry %s is invalid: %s", self._registry_path, e)
                raise AdapterFormatError(str(e)) from None
            logger.error("adapter registry %s is invalid, keeping the previous %d entries: %s",
                         self._registry_path, len(self._registry), e)
            return
        self._registry = registry
        logger.info("adapter registry %s loaded: %d entries", self._registry_path, len(registry))
