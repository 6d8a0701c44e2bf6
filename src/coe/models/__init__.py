"""Where weights come from: the packaged-model catalog, header readers, and expert sources."""

from coe.models.catalog import PACKAGED, ModelStore, PackagedModel, get_packaged
from coe.models.gguf import GGUFHeader, read_gguf_header
from coe.models.info import ModelInfo, describe
from coe.models.sources import backend_of, check_params, disk_info, parse_fleet_headers, path_of

__all__ = [
    "PACKAGED",
    "ModelStore",
    "PackagedModel",
    "get_packaged",
    "GGUFHeader",
    "read_gguf_header",
    "ModelInfo",
    "describe",
    "backend_of",
    "check_params",
    "disk_info",
    "parse_fleet_headers",
    "path_of",
]
