"""Where weights come from: the packaged-model catalog and header readers."""
from coe.models.catalog import PACKAGED, ModelStore, PackagedModel, get_packaged
from coe.models.gguf import GGUFHeader, read_gguf_header
from coe.models.info import ModelInfo, describe

__all__ = ["PACKAGED", "ModelStore", "PackagedModel", "get_packaged", "GGUFHeader",
           "read_gguf_header", "ModelInfo", "describe"]
