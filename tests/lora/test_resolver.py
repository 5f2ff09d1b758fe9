"""AdapterResolver: names -> LoRARequest inside roots / multi_lora.json, versions, refusals, hub."""

import json
import logging
import os
import threading

import huggingface_hub
import pytest

from multilora.errors import AdapterFormatError, AdapterNameError, AdapterNotFoundError
from multilora.lora import resolver as resolver_mod
from multilora.lora.resolver import AdapterResolver


def make_adapter(path, weights=b"weights"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text('{"r": 8}')
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


def bump_mtime(path, seconds=10):
    """Move mtime forward explicitly: a rewrite within the filesystem's clock tick keeps the old mtime."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def write_registry(path, entries):
    path.write_text(json.dumps(entries))
    bump_mtime(path)
    return path


@pytest.fixture
def root(tmp_path):
    return tmp_path / "adapters"


# ---- lookup ---------------------------------------------------------------------

def test_root_lookup_gives_real_dir_and_first_id(root):
    make_adapter(root / "sql")
    req = AdapterResolver([root]).resolve("sql")
    assert (req.lora_name, req.lora_int_id, req.lora_path) == ("sql", 1, os.path.realpath(root / "sql"))


def test_roots_are_searched_in_order(tmp_path):
    make_adapter(tmp_path / "r1" / "a")
    make_adapter(tmp_path / "r2" / "a")
    make_adapter(tmp_path / "r2" / "b")
    res = AdapterResolver([tmp_path / "r1", tmp_path / "r2"])
    assert res.resolve("a").lora_path == os.path.realpath(tmp_path / "r1" / "a")
    assert res.resolve("b").lora_path == os.path.realpath(tmp_path / "r2" / "b")


def test_dir_without_adapter_config_is_not_an_adapter(root):
    (root / "junk").mkdir(parents=True)
    (root / "junk" / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(AdapterNotFoundError):
        AdapterResolver([root]).resolve("junk")


def test_registry_lookup_relative_and_absolute(tmp_path, root):
    make_adapter(tmp_path / "elsewhere" / "rel")
    make_adapter(tmp_path / "abs_dir")
    make_adapter(root / "rel")  # the registry wins over the roots
    (tmp_path / "conf").mkdir()
    reg = write_registry(tmp_path / "conf" / "multi_lora.json",
                         {"rel": "../elsewhere/rel", "abs": str(tmp_path / "abs_dir")})
    res = AdapterResolver([root], registry_path=reg)
    assert res.resolve("rel").lora_path == os.path.realpath(tmp_path / "elsewhere" / "rel")
    assert res.resolve("abs").lora_path == os.path.realpath(tmp_path / "abs_dir")


def test_registry_reload_after_edit(tmp_path, caplog):
    make_adapter(tmp_path / "v1")
    make_adapter(tmp_path / "v2")
    make_adapter(tmp_path / "other")
    reg = write_registry(tmp_path / "multi_lora.json", {"a": "v1"})
    res = AdapterResolver(registry_path=reg)
    first = res.resolve("a")
    with pytest.raises(AdapterNotFoundError):
        res.resolve("b")
    with caplog.at_level(logging.INFO, logger=resolver_mod.__name__):
        write_registry(reg, {"a": "v2", "b": "other"})
        moved = res.resolve("a")
    assert moved.lora_path == os.path.realpath(tmp_path / "v2")
    assert moved.lora_int_id != first.lora_int_id  # a name pointed at new files is a new version
    assert res.resolve("b").lora_path == os.path.realpath(tmp_path / "other")
    assert "loaded: 2 entries" in caplog.text


def test_registry_is_parsed_only_when_it_changes(tmp_path, monkeypatch):
    make_adapter(tmp_path / "v1")
    reg = write_registry(tmp_path / "multi_lora.json", {"a": "v1"})
    res = AdapterResolver(registry_path=reg)
    calls = []
    real_parse = resolver_mod._parse_registry
    monkeypatch.setattr(resolver_mod, "_parse_registry", lambda *a: calls.append(1) or real_parse(*a))
    for _ in range(5):
        res.resolve("a")
    assert calls == []
    write_registry(reg, {"a": "v1", "b": "v1"})
    res.resolve("a")
    res.resolve("a")
    assert calls == [1]


def test_bad_registry_edit_keeps_previous_entries(tmp_path, caplog):
    make_adapter(tmp_path / "v1")
    reg = write_registry(tmp_path / "multi_lora.json", {"a": "v1"})
    res = AdapterResolver(registry_path=reg)
    reg.write_text('{"a": "v1", ')  # half-written edit
    bump_mtime(reg)
    with caplog.at_level(logging.ERROR, logger=resolver_mod.__name__):
        assert res.resolve("a").lora_path == os.path.realpath(tmp_path / "v1")
    assert "keeping the previous 1 entries" in caplog.text


def test_bad_registry_at_startup_raises(tmp_path):
    reg = tmp_path / "multi_lora.json"
    reg.write_text("[1, 2]")
    with pytest.raises(AdapterFormatError, match="JSON object"):
        AdapterResolver(registry_path=reg)


def test_registry_entry_without_adapter_config_is_a_format_error(tmp_path):
    (tmp_path / "empty").mkdir()
    reg = write_registry(tmp_path / "multi_lora.json", {"a": "empty"})
    with pytest.raises(AdapterFormatError) as err:
        AdapterResolver(registry_path=reg).resolve("a")
    assert str(tmp_path) not in str(err.value)


def test_new_dir_is_found_without_restart(root):
    root.mkdir()
    res = AdapterResolver([root])
    with pytest.raises(AdapterNotFoundError):
        res.resolve("late")
    make_adapter(root / "late")
    assert res.resolve("late").lora_path == os.path.realpath(root / "late")


def test_list_adapters(tmp_path, root):
    make_adapter(root / "b")
    make_adapter(root / "a")
    (root / "not_adapter").mkdir()
    make_adapter(tmp_path / "outside")
    os.symlink(tmp_path / "outside", root / "escape")
    reg = write_registry(tmp_path / "multi_lora.json", {"org/hubby": {"hub": "org/hubby", "revision": "v1"}})
    assert AdapterResolver([root], registry_path=reg).list_adapters() == ["a", "b", "org/hubby"]


# ---- versions -------------------------------------------------------------------

def test_unchanged_files_keep_id_changed_files_get_new_id(root):
    make_adapter(root / "a")
    make_adapter(root / "b")
    res = AdapterResolver([root])
    a1, b1 = res.resolve("a").lora_int_id, res.resolve("b").lora_int_id
    assert a1 != b1
    assert res.resolve("a").lora_int_id == a1
    weights = root / "a" / "adapter_model.safetensors"
    weights.write_bytes(b"other bytes")  # new size
    a2 = res.resolve("a").lora_int_id
    bump_mtime(weights)  # same size, new mtime
    a3 = res.resolve("a").lora_int_id
    bump_mtime(root / "a" / "adapter_config.json")
    a4 = res.resolve("a").lora_int_id
    (root / "a" / "extra.safetensors").write_bytes(b"x")  # a new weights file
    a5 = res.resolve("a").lora_int_id
    assert len({a1, b1, a2, a3, a4, a5}) == 6
    assert res.resolve("a").lora_int_id == a5
    assert res.resolve("b").lora_int_id == b1
    (root / "a" / "README.md").write_text("docs")  # not part of the adapter
    assert res.resolve("a").lora_int_id == a5


def test_same_size_file_renamed_into_place_with_preserved_mtime_is_a_new_version(root):
    make_adapter(root / "a", weights=b"old weights")
    res = AdapterResolver([root])
    before = res.resolve("a").lora_int_id
    weights = root / "a" / "adapter_model.safetensors"
    staged = root / "a" / "staged.tmp"       # same directory, so the rename is atomic (what `cp -p` + `mv` do)
    staged.write_bytes(b"new weights")
    st = os.stat(weights)
    os.utime(staged, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(staged, weights)
    after_st = os.stat(weights)
    assert (after_st.st_size, after_st.st_mtime_ns) == (st.st_size, st.st_mtime_ns)   # what the old version saw
    after = res.resolve("a").lora_int_id
    assert after != before
    assert res.resolve("a").lora_int_id == after


def test_deeply_nested_registry_is_a_format_error(tmp_path):
    reg = tmp_path / "multi_lora.json"
    reg.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterFormatError):
        AdapterResolver(registry_path=reg)


def test_same_id_from_many_threads(root):
    make_adapter(root / "a")
    make_adapter(root / "b")
    res = AdapterResolver([root])
    ids = {"a": [], "b": []}
    start = threading.Barrier(16)

    def worker(name):
        start.wait()
        for _ in range(50):
            ids[name].append(res.resolve(name).lora_int_id)

    threads = [threading.Thread(target=worker, args=("ab"[i % 2],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids["a"]) == len(ids["b"]) == 400
    assert len(set(ids["a"])) == 1 and len(set(ids["b"])) == 1
    assert {ids["a"][0], ids["b"][0]} == {1, 2}


# ---- refusals -------------------------------------------------------------------

BAD_NAMES = ["../x", "/etc/passwd", "a/b", "a/../b", "..", ".", "", "x" * 129, "a\\b", "..\\x",
             "a\x00b", "sub/..", "x/", "a b", "~root", "C:x"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_non_names_are_refused(tmp_path, root, name):
    make_adapter(root / "a")
    make_adapter(root / "b")
    make_adapter(tmp_path / "x")  # what "../x" would reach if it were joined
    with pytest.raises(AdapterNameError) as err:
        AdapterResolver([root]).resolve(name)
    assert str(tmp_path) not in str(err.value)
    assert "a valid adapter name" in str(err.value)


def test_non_string_name_is_refused(root):
    with pytest.raises(AdapterNameError, match="must be a string"):
        AdapterResolver([root]).resolve(b"a")


def test_longest_name_is_allowed(root):
    name = "n" * 128
    make_adapter(root / name)
    assert AdapterResolver([root]).resolve(name).lora_name == name


def test_symlinked_dir_leaving_root_is_refused(tmp_path, root, caplog):
    make_adapter(tmp_path / "outside")
    root.mkdir()
    os.symlink(tmp_path / "outside", root / "evil")
    with caplog.at_level(logging.WARNING, logger=resolver_mod.__name__), pytest.raises(AdapterNameError) as err:
        AdapterResolver([root]).resolve("evil")
    assert str(tmp_path) not in str(err.value) and "leaves the adapter root" in str(err.value)
    assert str(tmp_path / "outside") in caplog.text  # the operator gets the details


def test_symlinked_file_leaving_root_is_refused(tmp_path, root):
    make_adapter(root / "a")
    (tmp_path / "secret.safetensors").write_bytes(b"s")
    os.symlink(tmp_path / "secret.safetensors", root / "a" / "more.safetensors")
    with pytest.raises(AdapterNameError) as err:
        AdapterResolver([root]).resolve("a")
    assert str(tmp_path) not in str(err.value)


def test_symlink_within_root_is_served(root):
    make_adapter(root / "real")
    os.symlink(root / "real", root / "alias")
    res = AdapterResolver([root])
    alias, real = res.resolve("alias"), res.resolve("real")
    assert alias.lora_path == real.lora_path == os.path.realpath(root / "real")
    assert alias.lora_int_id != real.lora_int_id  # ids are per name


def test_unknown_adapter_is_not_found_without_listing_names(root):
    make_adapter(root / "secret_customer")
    with pytest.raises(AdapterNotFoundError) as err:
        AdapterResolver([root]).resolve("nope")
    msg = str(err.value)
    assert "unknown adapter 'nope'" in msg
    assert "secret_customer" not in msg and str(root) not in msg


# ---- hub ------------------------------------------------------------------------

@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    calls = []

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(make_adapter(tmp_path / "hub_cache" / kwargs["repo_id"].replace("/", "--") / kwargs["revision"]))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hub_entry_downloads_once(tmp_path, root, fake_hub):
    reg = write_registry(tmp_path / "multi_lora.json",
                         {"org/sql": {"hub": "org/sql-lora", "revision": "abc123"}})
    res = AdapterResolver([root], registry_path=reg, hub_cache_dir=tmp_path / "hub_cache")
    first = res.resolve("org/sql")
    assert fake_hub == [{"repo_id": "org/sql-lora", "revision": "abc123",
                         "allow_patterns": ["adapter_config.json", "*.safetensors"],
                         "cache_dir": str(tmp_path / "hub_cache")}]
    assert first.lora_path == os.path.realpath(tmp_path / "hub_cache" / "org--sql-lora" / "abc123")
    assert res.resolve("org/sql").lora_int_id == first.lora_int_id
    assert len(fake_hub) == 1


def test_unlisted_names_never_download(tmp_path, root, fake_hub):
    reg = write_registry(tmp_path / "multi_lora.json", {"listed": {"hub": "org/listed", "revision": "v1"}})
    res = AdapterResolver([root], registry_path=reg)
    with pytest.raises(AdapterNameError):
        res.resolve("org/listed")  # a repo id is not a name unless it is a registry key
    with pytest.raises(AdapterNotFoundError):
        res.resolve("unlisted")
    assert fake_hub == []


def test_hub_entry_without_revision_fails_at_load(tmp_path):
    reg = write_registry(tmp_path / "multi_lora.json", {"a": {"hub": "org/a"}})
    with pytest.raises(AdapterFormatError, match="revision"):
        AdapterResolver(registry_path=reg)


def test_hub_download_failure_is_not_found(tmp_path, monkeypatch):
    def fail(**kwargs):
        raise OSError(f"no network while fetching into {tmp_path}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    reg = write_registry(tmp_path / "multi_lora.json", {"a": {"hub": "org/a", "revision": "v1"}})
    with pytest.raises(AdapterNotFoundError, match="could not be downloaded") as err:
        AdapterResolver(registry_path=reg).resolve("a")
    assert str(tmp_path) not in str(err.value)
