"""Only safetensors and GGUF are loaded; truncated or corrupt files fail that expert with a clear
error and the engine keeps serving the others."""
from __future__ import annotations

import shutil

import pytest

from coe.backends.memory import HostBufferPool
from coe.backends.torch import TorchBackend
from coe.config import ExpertConfig
from coe.errors import CoEError, ModelNotAvailable
from coe.models.info import describe


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def read(path):
    backend = TorchBackend()
    return backend.read(ExpertConfig("x", str(path), backend="torch_hf"), path, HostBufferPool())


def test_pickle_checkpoints_are_refused_naming_the_file(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "pickled")
    for file in folder.glob("*.safetensors"):
        file.rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelNotAvailable, match="pytorch_model.bin.*unpickling can run code"):
        describe(folder)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_a_truncated_safetensors_file_is_a_clear_error(tiny_checkpoint, tmp_path, keep):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / f"cut{keep}")
    (file,) = folder.glob("*.safetensors")
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CoEError) as info:
        read(folder)
    assert file.name in info.value.message or str(folder) in info.value.message


def test_a_garbage_header_is_a_clear_error(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "garbage")
    (file,) = folder.glob("*.safetensors")
    file.write_bytes(b"\xff" * 64 + file.read_bytes()[64:])
    with pytest.raises(CoEError, match="safetensors"):
        read(folder)
