"""Untrusted files: a crafted .bin or checkpoint is refused without running its code; real ones still load."""
import os
import pickle
import struct

import cv2
import numpy as np
import pytest
import torch

from utils.artifacts.files import ArtifactError
from utils.models.checkpoint import load_checkpoint, load_head_state, rng_state, save_checkpoint, set_rng_state
from utils.evaluation.verification import load_bin


class TouchOnLoad:
    """A pickle payload that, if unpickled without restriction, creates `marker` through a shell."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _png(seed):
    img = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


def test_crafted_bin_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "lfw.bin"
    crafted.write_bytes(pickle.dumps(([_png(0), TouchOnLoad(marker)], [True])))
    # the file is a real exploit: an unrestricted load runs it
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(TouchOnLoad(control)))
    assert control.exists()

    with pytest.raises(ArtifactError, match=r"lfw\.bin: refused to load: the pickle asks for posix\.system; "
                                            r"a \.bin holds only encoded images and bool labels"):
        load_bin(crafted)
    assert not marker.exists()


def test_bin_refuses_other_globals_and_codecs(tmp_path):
    evil = tmp_path / "agedb.bin"
    evil.write_bytes(pickle.dumps(([eval, b""], [False])))
    with pytest.raises(ArtifactError, match=r"agedb\.bin: refused to load: the pickle asks for builtins\.eval"):
        load_bin(evil)
    # `_codecs.encode` is admitted for latin1 only (how protocol 2 stores bytes), not for other codecs
    raw = b"\x80\x02(c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00base64\x86Rl]\x88a\x86."
    (tmp_path / "codec.bin").write_bytes(raw)
    with pytest.raises(ValueError, match="codec.bin.*latin1 only"):
        load_bin(tmp_path / "codec.bin")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_real_bins_of_every_protocol_with_numpy_and_bytearray_entries(tmp_path, protocol):
    encoded = [_png(i) for i in range(4)]
    entries = [encoded[0], bytearray(encoded[1]), np.frombuffer(encoded[2], np.uint8), encoded[3]]
    path = tmp_path / f"p{protocol}.bin"
    path.write_bytes(pickle.dumps((entries, [True, np.bool_(False)]), protocol=protocol))
    (images, _), issame = load_bin(path, (16, 16))
    assert images.shape == (4, 3, 16, 16) and issame.tolist() == [True, False]


def _py2_uint8_array(data: bytes) -> bytes:
    """What Python 2's cPickle writes for a numpy uint8 array (numpy 1 module names, payload as a str)."""
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01J"
            + struct.pack("<i", len(data)) + b"\x85cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNN"
            b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T" + struct.pack("<I", len(data)) + data + b"tb")


def test_python2_bin_of_numpy_arrays(tmp_path):
    encoded = [_png(i) for i in range(2)]
    raw = b"\x80\x02(" + b"".join(_py2_uint8_array(e) for e in encoded) + b"l](\x89e\x86."
    (tmp_path / "py2np.bin").write_bytes(raw)
    (images, _), issame = load_bin(tmp_path / "py2np.bin", (16, 16))
    expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(encoded[1], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(images[1].permute(1, 2, 0).numpy(), expected)
    assert issame.tolist() == [False]


def test_crafted_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "backbone.pth"
    torch.save({"conv.weight": torch.zeros(2), "extra": TouchOnLoad(marker)}, crafted)
    control = tmp_path / "control"
    torch.save(TouchOnLoad(control), tmp_path / "control.pth")
    torch.load(tmp_path / "control.pth", weights_only=False)
    assert control.exists()

    with pytest.raises(ArtifactError, match=r"backbone\.pth: refused to load: the file asks for posix\.system; "
                                            r"a checkpoint holds only tensors and plain values$"):
        load_checkpoint(crafted)
    assert not marker.exists()


def test_checkpoint_with_numpy_state_names_the_old_format(tmp_path):
    torch.save({"rng": {"numpy": np.random.get_state()}}, tmp_path / "resume_rank0_epoch001.pt")
    with pytest.raises(ArtifactError, match=r"asks for numpy\..*earlier version of this toolkit"):
        load_checkpoint(tmp_path / "resume_rank0_epoch001.pt")


def test_truncated_checkpoint_is_one_line(tmp_path):
    save_checkpoint(tmp_path / "a.pt", {"w": torch.ones(100)})
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "a.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"a\.pt: not a readable torch checkpoint") as e:
        load_checkpoint(tmp_path / "a.pt")
    assert "\n" not in str(e.value)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    np.random.seed(1)
    np.random.normal()  # leaves a cached Gaussian: part of the state
    random.seed(2)
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    first = (np.random.normal(3), random.random(), torch.rand(3))
    np.random.seed(9), random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = (np.random.normal(3), random.random(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


# ------------------------------------------------------------------------------------------ heads
def _epoch_checkpoint(folder, epoch=2, classes=5, dim=4):
    head = {"weight": torch.arange(classes * dim, dtype=torch.float32).reshape(classes, dim)}
    info = {"name": "CosFace", "in_features": dim, "num_classes": classes, "kwargs": {"s": 64.0, "m": 0.35}}
    save_checkpoint(folder / f"epoch_{epoch:03d}.pt", {"backbone": {}, "head": head, "head_info": info,
                                                       "epoch": epoch})
    save_checkpoint(folder / "last.pt", {"epoch": epoch, "world_size": 1,
                                         "fingerprint": {"num_images": 10, "num_classes": classes, "idx_size": 1}})
    return head, info


def test_load_head_state_accepts_every_form(tmp_path):
    head, info = _epoch_checkpoint(tmp_path)
    for given in (tmp_path / "epoch_002.pt", tmp_path / "last.pt", str(tmp_path / "last.pt"),
                  load_checkpoint(tmp_path / "epoch_002.pt")):
        got_info, state = load_head_state(given)
        assert got_info == info and torch.equal(state["weight"], head["weight"])
    # the paper repository's `kernel` (in_features, classes), saved from a DDP model
    torch.save({"module.kernel": head["weight"].t().clone()}, tmp_path / "header.pth")
    got_info, state = load_head_state(tmp_path / "header.pth")
    assert got_info is None and torch.equal(state["weight"], head["weight"])


def test_load_head_state_refuses_other_dicts(tmp_path):
    _epoch_checkpoint(tmp_path)
    with pytest.raises(ArtifactError, match="last.pt marker.*pass its path"):
        load_head_state(load_checkpoint(tmp_path / "last.pt"))
    save_checkpoint(tmp_path / "opt.pt", {"state": {}, "param_groups": []})
    with pytest.raises(ArtifactError, match=r"opt\.pt: expected a head state dict with 'weight'.*'kernel'.*"
                                            r"found keys \['param_groups', 'state'\]"):
        load_head_state(tmp_path / "opt.pt")
    (tmp_path / "epoch_002.pt").unlink()
    with pytest.raises(ArtifactError, match="names epoch 2, but epoch_002.pt is not beside it"):
        load_head_state(tmp_path / "last.pt")
