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
