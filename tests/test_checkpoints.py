"""Our checkpoint format (training/checkpoints.py): a checkpoint cannot run code, random states are plain
tensors, and checkpoints written before that change still load and resume exactly."""
import os
import random

import numpy as np
import pytest
import torch

import sample
import soflow
import training.checkpoints
import training.released
from training.processes import Processes


class Payload:
    """Pickles as a call of open(marker, "w"): loading it would create the marker file."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def ours(net):
    weights = net.state_dict()
    return dict(arch="MLP", arch_kwargs=net.init_kwargs, model=weights, ema=weights,
                config=soflow.PRESETS["toy"].__dict__.copy())


def released(net):
    weights = {"network." + k: v for k, v in net.state_dict().items()}
    return dict(model=weights, ema_model=weights, finished_steps=1)


@pytest.mark.parametrize("layout", [ours, released])
def test_a_checkpoint_that_would_run_code_is_refused_and_never_run(tmp_path, layout):
    marker = tmp_path / "ran"
    net = soflow.DiT_models["DiT-T/4"](input_size=8, num_classes=0) if layout is released else soflow.MLP()
    path = tmp_path / "evil.pt"
    torch.save({**layout(net), "extra": Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"evil.pt is not a PyTorch checkpoint of weights \(UnpicklingError"):
        soflow.load_network(path)
    with pytest.raises(ValueError, match=r"evil.pt is not a PyTorch checkpoint of weights \(UnpicklingError"):
        training.released.open_checkpoint(path)
    with pytest.raises(SystemExit, match="evil.pt is not a PyTorch checkpoint of weights"):
        sample.main(["--ckpt", str(path), "--out", str(tmp_path / "x")])
    assert training.checkpoints.read_checkpoint(path)[1].startswith("UnpicklingError")
    assert not marker.exists()
    # The same file without the payload loads: the refusal is the payload's.
    torch.save(layout(net), path)
    assert type(soflow.load_network(path)) is type(net)


def test_random_states_are_tensors_and_plain_values_and_restore_every_stream():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = training.checkpoints.rng_state()
    kind, key, *rest = state["numpy"]
    assert kind == "MT19937" and torch.is_tensor(key) and key.shape == (624,)
    first = (random.random(), np.random.standard_normal(3), torch.randn(3))
    training.checkpoints.set_rng_state(state)
    again = (random.random(), np.random.standard_normal(3), torch.randn(3))
    assert first[0] == again[0] and np.array_equal(first[1], again[1]) and torch.equal(first[2], again[2])


def test_a_checkpoint_of_the_old_format_loads_weights_only_and_resumes(tmp_path):
    """Written before the random states became tensors: numpy's state as np.random.get_state's array."""
    net = soflow.MLP(hidden=8, depth=1)
    path = tmp_path / "old.pt"
    np.random.seed(5)
    legacy = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                  cuda=None)
    torch.save({**ours(net), "optimizer": {}, "step": 3, "run_config": {}, "rng": [legacy]}, path)
    ckpt, problem = training.checkpoints.read_checkpoint(path)
    assert problem == "" and isinstance(ckpt["rng"][0]["numpy"][1], np.ndarray)
    expected = np.random.standard_normal(4)
    np.random.seed(0)
    training.checkpoints.set_rng_state(ckpt["rng"][0])
    assert np.array_equal(np.random.standard_normal(4), expected)       # numpy's stream continues as it was
    assert type(training.released.open_checkpoint(path, procs=Processes())[0]) is soflow.MLP
    # An array of Python objects needs more than the allowlist gives: still refused.
    torch.save({**ours(net), "rng": [np.array([Payload(tmp_path / "ran")], dtype=object)]}, path)
    assert training.checkpoints.read_checkpoint(path)[1].startswith("UnpicklingError")
    assert not os.path.exists(tmp_path / "ran")
