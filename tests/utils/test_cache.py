"""Keyed caches: reused only when their key matches; a damaged entry is recomputed, never read."""
import torch

from lolrl.utils.cache import Cache, hash_json


def test_roundtrip_and_key_mismatch(tmp_path, caplog):
    cache = Cache(tmp_path)
    key = hash_json({"data": 1})
    cache.save("entry", key, {"offsets": [0, 2]}, {"x": torch.arange(3.0)})
    payload, tensors = cache.load("entry", key)
    assert payload == {"offsets": [0, 2]} and torch.equal(tensors["x"], torch.arange(3.0))
    with caplog.at_level("WARNING"):
        assert cache.load("entry", hash_json({"data": 2})) is None
    assert "computed from other inputs" in caplog.text


def test_damaged_entries_are_never_read(tmp_path, caplog):
    cache = Cache(tmp_path)
    key = hash_json("k")
    cache.save("entry", key, {"a": 1}, {"x": torch.ones(1000)})
    tensor_file = tmp_path / "entry.safetensors"
    tensor_file.write_bytes(tensor_file.read_bytes()[:100])  # a write cut short
    with caplog.at_level("WARNING"):
        assert cache.load("entry", key) is None
    assert "damaged" in caplog.text
    (tmp_path / "entry.json").write_text('{"key": "')  # half-written JSON
    assert cache.load("entry", key) is None
    # a JSON and a tensor file from two different runs never mix
    cache.save("entry", key, {"a": 1}, {"x": torch.ones(2)})
    Cache(tmp_path).save("other", hash_json("other"), {}, {"x": torch.zeros(2)})
    (tmp_path / "other.safetensors").replace(tmp_path / "entry.safetensors")
    assert cache.load("entry", key) is None


def test_writes_leave_no_temporary_files(tmp_path):
    Cache(tmp_path).save("entry", "k", {"a": 1}, {"x": torch.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.json", "entry.safetensors"]


class TwoProcesses:
    """An Accelerator's surface as the cache sees it, on one of two processes; ``found_elsewhere``:
    whether the other process found the entry (what its ``reduce`` adds to this one's flag)."""

    num_processes, device = 2, "cpu"

    def __init__(self, is_main: bool, found_elsewhere: bool):
        self.is_main_process, self.found_elsewhere = is_main, found_elsewhere
        self.barriers = 0

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor + float(self.found_elsewhere)

    def wait_for_everyone(self):
        self.barriers += 1


def test_processes_reuse_an_entry_only_when_every_one_found_it(tmp_path, caplog):
    """A process that decided alone (the other one saw no entry yet) would leave the collectives of the
    recomputation out of step: the entry is used only if every process found it, else all recompute."""
    key = hash_json("k")
    Cache(tmp_path).save("entry", key, {"a": 1}, {"x": torch.ones(2)})
    assert Cache(tmp_path, accelerator=TwoProcesses(True, found_elsewhere=True)).load("entry", key)[0] == {"a": 1}
    with caplog.at_level("WARNING"):
        assert Cache(tmp_path, accelerator=TwoProcesses(True, found_elsewhere=False)).load("entry", key) is None
    assert "another process could not read it" in caplog.text
    assert Cache(tmp_path / "none", accelerator=TwoProcesses(False, found_elsewhere=True)).load("entry", key) is None


def test_a_save_returns_once_every_process_can_read_it(tmp_path):
    key = hash_json("k")
    main, other = TwoProcesses(True, True), TwoProcesses(False, True)
    Cache(tmp_path / "a", accelerator=other).save("entry", key, {"a": 1})
    assert not (tmp_path / "a" / "entry.json").exists() and other.barriers == 1  # only the main process writes
    Cache(tmp_path / "a", accelerator=main).save("entry", key, {"a": 1})
    assert (tmp_path / "a" / "entry.json").exists() and main.barriers == 1
