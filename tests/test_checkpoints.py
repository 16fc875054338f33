"""Safe checkpoint reading: plain-data extras load, code never runs, broken files are named."""

import os
import pickle
import sys
import types

import pytest
import torch

from vlmlab.encoders.checkpoints import CheckpointError, mismatch_report, read_state_dict, safe_unpickle


def test_yacs_config_beside_weights_loads_as_plain_data(tmp_path, monkeypatch):
    # VMamba's classification checkpoints pickle a yacs CfgNode next to 'model'
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    config.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", config)
    cfg = CfgNode(MODEL=CfgNode(NAME="vssm"))
    torch.save({"model": {"w": torch.ones(3)}, "config": cfg, "epoch": 222}, tmp_path / "c.pth")
    monkeypatch.delitem(sys.modules, "yacs.config")  # the loader must not need yacs installed
    sd = read_state_dict(tmp_path / "c.pth")
    assert list(sd) == ["w"] and torch.equal(sd["w"], torch.ones(3))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(tmp_path / "evil.pth")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refusing to load global"):
        safe_unpickle(tmp_path / "evil.pkl")


def test_truncated_files_are_named(tmp_path):
    torch.save({"model": {"w": torch.zeros(1000)}}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth"):
        read_state_dict(tmp_path / "cut.pth")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        read_state_dict(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_state_dict(tmp_path / "missing.pth")


def test_mismatch_report_lists_all_three_kinds():
    model = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    ckpt = {"a": torch.zeros(2), "b": torch.zeros(4), "d": torch.zeros(1)}
    rep = mismatch_report(model, ckpt)
    assert "1 missing keys" in rep and "c" in rep
    assert "1 unexpected keys" in rep and "d" in rep
    assert "1 mis-shaped keys" in rep and "b: checkpoint (4,) vs model (3,)" in rep
    assert mismatch_report(model, model) == ""
