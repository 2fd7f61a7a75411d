"""Import of the released Caffe models, fetching/caching, and model names."""

from __future__ import annotations

import functools
import http.server
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pooch
import pytest
import torch

from wsi_lymph.cache import CACHE_ENV
from wsi_lymph.models import caffe
from wsi_lymph.models import registry as models
from wsi_lymph.models.caffe import (
    CaffeImportError,
    caffe_to_state_dict,
    import_caffe,
    read_binaryproto,
    read_caffemodel,
)
from wsi_lymph.models.checkpoints import ModelError, load_checkpoint, load_checkpoint_members
from wsi_lymph.models.networks import PatchNet

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RELEASED = DATA / "models" / "janowczyk2016-lymphocyte"
FOLDS = (1, 2, 3, 4, 5)

EXPECTED_SHAPES = {
    "conv1": [(32, 3, 5, 5), (32,)],
    "conv2": [(32, 32, 5, 5), (32,)],
    "conv3": [(64, 32, 5, 5), (64,)],
    "ip1": [(64, 1024), (64,)],
    "ip2": [(2, 64), (2,)],
}


def readme_hashes() -> dict[str, str]:
    """File name -> sha256 as published in the data README."""
    text = (DATA / "README.md").read_text()
    block = re.search(r"sha256:\n```\n(.*?)```", text, re.S).group(1)
    return {name: digest for digest, name in (line.split() for line in block.splitlines())}


def caffemodel(k: int) -> Path:
    return RELEASED / models.caffemodel_filename(k)


def meanfile(k: int) -> Path:
    return RELEASED / models.mean_filename(k)


@pytest.fixture(scope="module")
def fetched_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache populated once from the local copy of the released files."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(cache))
        mp.delenv(models.SOURCE_ENV, raising=False)
        models.fetch_janowczyk2016(RELEASED.as_uri())
    return cache


@pytest.fixture
def use_cache(fetched_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(fetched_cache))
    monkeypatch.delenv(models.SOURCE_ENV, raising=False)
    return fetched_cache


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    monkeypatch.delenv(models.SOURCE_ENV, raising=False)
    return cache


# --------------------------------------------------------------------------- reading and import


@pytest.mark.shared_data
def test_known_hashes_match_readme() -> None:
    assert readme_hashes() == models.JANOWCZYK2016_SHA256
    for name, digest in readme_hashes().items():
        assert pooch.file_hash(str(RELEASED / name)) == digest


@pytest.mark.shared_data
def test_read_released_files() -> None:
    blobs = read_caffemodel(caffemodel(1))
    assert {k: [b.shape for b in v] for k, v in blobs.items()} == EXPECTED_SHAPES
    assert all(b.dtype == np.float32 for v in blobs.values() for b in v)
    mean = read_binaryproto(meanfile(1))
    assert mean.shape == (3, 32, 32) and mean.dtype == np.float32
    # A BGR 0-255 mean of H&E patches: well inside the range, blue channel brightest.
    assert mean.min() > 0 and mean.max() < 255
    assert mean[0].mean() > mean[1].mean()


@pytest.mark.shared_data
@pytest.mark.parametrize("fold", FOLDS)
def test_import_fold(fold: int, tmp_path: Path) -> None:
    out = import_caffe(
        caffemodel(fold),
        meanfile(fold),
        tmp_path / "m" / f"fold{fold}.pt",
        name=f"janowczyk2016/fold{fold}",
        fold=fold,
    )
    assert out == tmp_path / "m" / f"fold{fold}.pt"
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind
    ckpt = torch.load(out, weights_only=True)
    assert set(ckpt) == {"state_dict", "mean_bgr", "meta"}
    expected = PatchNet().state_dict()
    assert {k: v.shape for k, v in ckpt["state_dict"].items()} == {k: v.shape for k, v in expected.items()}
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())
    assert ckpt["mean_bgr"].shape == (3, 32, 32) and ckpt["mean_bgr"].dtype == torch.float32
    meta = ckpt["meta"]
    assert meta["format"] == "wsi-lymph-checkpoint/1"
    assert meta["arch"] == "janowczyk2016-patch32"
    assert meta["name"] == f"janowczyk2016/fold{fold}" and meta["fold"] == fold
    assert meta["channel_order"] == "BGR" and meta["input_range"] == 255.0 and meta["class_index"] == 1
    assert meta["model_mpp"] == pytest.approx(0.125)
    assert meta["source_scan_mpp"] == 0.5 and meta["frame_scale"] == 4.0
    assert meta["threshold"] == 0.7706
    assert meta["created_by"].startswith("wsi-lymph ")
    hashes = readme_hashes()
    assert meta["source_files"] == {p.name: hashes[p.name] for p in (caffemodel(fold), meanfile(fold))}
    # The weights are the file's, unchanged.
    blobs = read_caffemodel(caffemodel(fold))
    np.testing.assert_array_equal(ckpt["state_dict"]["conv2.weight"].numpy(), blobs["conv2"][0])
    np.testing.assert_array_equal(ckpt["state_dict"]["ip1.weight"].numpy(), blobs["ip1"][0])
    np.testing.assert_array_equal(ckpt["mean_bgr"].numpy(), read_binaryproto(meanfile(fold)))
    net, mean, meta2 = load_checkpoint(out)
    assert not net.training and meta2 == meta and mean.device.type == "cpu"


@pytest.mark.shared_data
def test_truncated_caffemodel(tmp_path: Path) -> None:
    bad = tmp_path / "1_truncated.caffemodel"
    bad.write_bytes(caffemodel(1).read_bytes()[:300_001])
    with pytest.raises(CaffeImportError, match=re.escape(str(bad))):
        read_caffemodel(bad)
    with pytest.raises(CaffeImportError, match="1_truncated.caffemodel"):
        import_caffe(bad, meanfile(1), tmp_path / "out.pt", name="x", fold=1)
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.shared_data
@pytest.mark.parametrize("payload", [b"", b"\xff" * 64, b"hello, this is not a protobuf message\n" * 10])
def test_non_protobuf_input(tmp_path: Path, payload: bytes) -> None:
    bad = tmp_path / "garbage.caffemodel"
    bad.write_bytes(payload)
    with pytest.raises(CaffeImportError, match="garbage.caffemodel"):
        read_caffemodel(bad)
    mean = tmp_path / "garbage.binaryproto"
    mean.write_bytes(payload)
    with pytest.raises(CaffeImportError, match="garbage.binaryproto"):
        read_binaryproto(mean)


def _fake_net(layers: dict[str, list[np.ndarray]], *, legacy: bool = False) -> bytes:
    """Serialise a NetParameter holding ``layers`` with this project's own minimal schema."""
    net = caffe.MESSAGES["NetParameter"](name="fake")
    for name, arrays in layers.items():
        layer = net.layers.add(name=name) if legacy else net.layer.add(name=name, type="Convolution")
        for arr in arrays:
            blob = layer.blobs.add()
            if legacy:
                # Old Caffe: always 4-D, lower ranks padded with leading 1s.
                blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - arr.ndim) + arr.shape
            else:
                blob.shape.dim.extend(arr.shape)
            blob.data.extend(arr.ravel().tolist())
    return net.SerializeToString()


@pytest.mark.shared_data
def test_wrong_blob_shape(tmp_path: Path) -> None:
    blobs = read_caffemodel(caffemodel(1))
    blobs["conv2"][0] = np.zeros((32, 32, 3, 3), np.float32)
    path = tmp_path / "wrong.caffemodel"
    path.write_bytes(_fake_net(blobs))
    expected = f"{path}: layer 'conv2' blob 0 has shape (32, 32, 3, 3) but the network expects (32, 32, 5, 5)"
    with pytest.raises(CaffeImportError, match=re.escape(expected)):
        import_caffe(path, meanfile(1), tmp_path / "out.pt", name="x", fold=None)


@pytest.mark.shared_data
def test_missing_and_extra_layers(tmp_path: Path) -> None:
    blobs = read_caffemodel(caffemodel(1))
    without = {k: v for k, v in blobs.items() if k != "ip2"}
    with pytest.raises(CaffeImportError, match="src.caffemodel: layer 'ip2' is missing"):
        caffe_to_state_dict(without, "src.caffemodel")
    one_blob = {**blobs, "conv3": blobs["conv3"][:1]}
    with pytest.raises(CaffeImportError, match="layer 'conv3' has 1 blobs"):
        caffe_to_state_dict(one_blob, "src.caffemodel")
    extra = {**blobs, "bn1": [np.ones(32, np.float32)]}
    with pytest.raises(CaffeImportError, match="bn1"):
        caffe_to_state_dict(extra, "src.caffemodel")


@pytest.mark.shared_data
def test_blob_data_size_mismatch(tmp_path: Path) -> None:
    net = caffe.MESSAGES["NetParameter"]()
    blob = net.layer.add(name="conv1").blobs.add()
    blob.shape.dim.extend([2, 3])
    blob.data.extend([1.0, 2.0])
    path = tmp_path / "short.caffemodel"
    path.write_bytes(net.SerializeToString())
    with pytest.raises(
        CaffeImportError, match=r"short.caffemodel: layer 'conv1' blob 0 declares shape \(2, 3\)"
    ):
        read_caffemodel(path)


@pytest.mark.shared_data
def test_legacy_v1_layers(tmp_path: Path) -> None:
    blobs = read_caffemodel(caffemodel(2))
    path = tmp_path / "legacy.caffemodel"
    path.write_bytes(_fake_net(blobs, legacy=True))
    legacy = read_caffemodel(path)
    assert {k: [b.shape for b in v] for k, v in legacy.items()} == EXPECTED_SHAPES
    state = caffe_to_state_dict(legacy, str(path))
    np.testing.assert_array_equal(state["ip1.weight"].numpy(), blobs["ip1"][0])


@pytest.mark.shared_data
def test_wrong_mean_shape(tmp_path: Path) -> None:
    blob = caffe.MESSAGES["BlobProto"](num=1, channels=3, height=16, width=16)
    blob.data.extend([0.0] * (3 * 16 * 16))
    path = tmp_path / "small_mean.binaryproto"
    path.write_bytes(blob.SerializeToString())
    assert read_binaryproto(path).shape == (3, 16, 16)
    with pytest.raises(CaffeImportError, match=r"small_mean.binaryproto: mean image has shape \(3, 16, 16\)"):
        import_caffe(caffemodel(1), path, tmp_path / "out.pt", name="x", fold=None)


# --------------------------------------------------------------------------- fetching and the cache


@pytest.mark.shared_data
def test_fetch_from_file_url(empty_cache: Path, capfd: pytest.CaptureFixture[str]) -> None:
    messages: list[str] = []
    paths = models.fetch_janowczyk2016(RELEASED.as_uri(), progress=messages.append)
    assert capfd.readouterr() == ("", "")  # progress goes to the callback only, pooch's own log is silenced
    assert paths == [empty_cache / "models" / "janowczyk2016" / f"fold{k}.pt" for k in FOLDS]
    assert all(p.is_file() for p in paths)
    assert sum(m.startswith("downloading ") for m in messages) == 10
    downloads = empty_cache / "downloads" / "janowczyk2016"
    assert sorted(p.name for p in downloads.iterdir()) == sorted(readme_hashes())
    for p in paths:
        torch.load(p, weights_only=True)

    mtimes = [p.stat().st_mtime_ns for p in paths]
    messages.clear()
    assert models.fetch_janowczyk2016(RELEASED.as_uri(), progress=messages.append) == paths
    assert messages == []
    assert [p.stat().st_mtime_ns for p in paths] == mtimes


@pytest.mark.shared_data
def test_fetch_from_env_source_plain_folder(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(models.SOURCE_ENV, str(RELEASED))  # a folder path, not a URL
    messages: list[str] = []
    paths = models.fetch_janowczyk2016(progress=messages.append, folds=[4])
    assert paths == [empty_cache / "models" / "janowczyk2016" / "fold4.pt"]
    assert paths[0].is_file()
    assert any(RELEASED.as_uri() in m for m in messages)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_mirror() -> Iterator[str]:
    """A real HTTP server on localhost serving the released files; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(RELEASED))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.shared_data
def test_fetch_over_http(empty_cache: Path, http_mirror: str) -> None:
    messages: list[str] = []
    paths = models.fetch_janowczyk2016(http_mirror, progress=messages.append, folds=[3])
    assert messages[:2] == [f"downloading {http_mirror}/{models.caffemodel_filename(3)}",
                            f"downloading {http_mirror}/{models.mean_filename(3)}"]
    assert torch.load(paths[0], weights_only=True)["meta"]["fold"] == 3
    with pytest.raises(ModelError, match=r"could not download .*404") as err:
        models.fetch_janowczyk2016(f"{http_mirror}/no-such-folder", folds=[1])
    assert "WSI_LYMPH_MODEL_SOURCE" in str(err.value)
    downloads = empty_cache / "downloads" / "janowczyk2016"
    # Nothing of the failed fold is left behind.
    assert sorted(p.name for p in downloads.iterdir()) == [models.caffemodel_filename(3), models.mean_filename(3)]


@pytest.mark.shared_data
def test_corrupt_download_is_fetched_again(empty_cache: Path) -> None:
    models.fetch_janowczyk2016(str(RELEASED), folds=[2])
    cached = empty_cache / "downloads" / "janowczyk2016" / models.caffemodel_filename(2)
    cached.write_bytes(b"damaged")
    models.janowczyk2016_checkpoint(2).unlink()
    messages: list[str] = []
    models.fetch_janowczyk2016(str(RELEASED), folds=[2], progress=messages.append)
    # Only the damaged file is transferred again; the intact mean file is reused.
    assert [m for m in messages if m.startswith("downloading ")] == [
        f"downloading {RELEASED.as_uri()}/{models.caffemodel_filename(2)}"
    ]
    assert pooch.file_hash(str(cached)) == models.JANOWCZYK2016_SHA256[cached.name]
    assert models.janowczyk2016_checkpoint(2).is_file()

    messages.clear()
    models.fetch_janowczyk2016(str(RELEASED), folds=[2], progress=messages.append, force=True)
    assert sum(m.startswith("downloading ") for m in messages) == 2  # force fetches both files again


def test_source_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(models.SOURCE_ENV, raising=False)
    assert models.resolve_source() == models.DEFAULT_SOURCE
    monkeypatch.setenv(models.SOURCE_ENV, "https://mirror.example/models/")
    assert models.resolve_source() == "https://mirror.example/models"
    assert models.resolve_source(str(tmp_path)) == tmp_path.resolve().as_uri()


@pytest.mark.shared_data
def test_argument_beats_env(empty_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(models.SOURCE_ENV, str(tmp_path / "does-not-exist"))
    paths = models.fetch_janowczyk2016(RELEASED.as_uri(), folds=[5])
    assert paths[0].is_file()


@pytest.mark.shared_data
def test_bad_mirror_content(empty_cache: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / models.caffemodel_filename(1)).write_bytes(b"this is not the released model")
    (mirror / models.mean_filename(1)).write_bytes(meanfile(1).read_bytes())
    with pytest.raises(ModelError, match="sha256") as err:
        models.fetch_janowczyk2016(str(mirror), folds=[1])
    assert models.JANOWCZYK2016_SHA256[models.caffemodel_filename(1)] in str(err.value)
    assert models.caffemodel_filename(1) in str(err.value)
    downloads = empty_cache / "downloads" / "janowczyk2016"
    assert list(downloads.iterdir()) == []  # the bad file was deleted, no partial file left
    assert not models.janowczyk2016_checkpoint(1).exists()


def test_download_failure_message(empty_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="could not download") as err:
        models.fetch_janowczyk2016(str(tmp_path / "empty-mirror"), folds=[2])
    message = str(err.value)
    assert models.caffemodel_filename(2) in message
    assert "--source" in message and "WSI_LYMPH_MODEL_SOURCE" in message


# --------------------------------------------------------------------------- names and loading


@pytest.mark.shared_data
def test_resolve_names(use_cache: Path) -> None:
    assert len(models.resolve_model("janowczyk2016", fetch_missing=False)) == 5
    assert models.resolve_model("janowczyk2016/fold3", fetch_missing=False) == [
        use_cache / "models" / "janowczyk2016" / "fold3.pt"
    ]
    ckpt = models.janowczyk2016_checkpoint(2)
    assert models.resolve_model(str(ckpt)) == [ckpt]
    for bad in ("janowczyk2016/fold6", "janowczyk", "no/such/model.pt"):
        with pytest.raises(ModelError, match=re.escape("janowczyk2016/fold1")):
            models.resolve_model(bad)


def test_resolve_without_fetching(empty_cache: Path) -> None:
    with pytest.raises(ModelError, match="not in the cache"):
        models.resolve_model("janowczyk2016/fold1", fetch_missing=False)


@pytest.mark.shared_data
def test_resolve_fetches_missing_fold(empty_cache: Path) -> None:
    paths = models.resolve_model("janowczyk2016/fold3", source=str(RELEASED))
    assert paths[0].is_file()
    assert not models.janowczyk2016_checkpoint(1).exists()  # only the fold asked for


@pytest.mark.shared_data
def test_load_ensemble(use_cache: Path) -> None:
    model = models.load_model("janowczyk2016", fetch_missing=False)
    assert model.name == "janowczyk2016"
    assert len(model.members) == 5
    assert all(not net.training and mean.shape == (3, 32, 32) for net, mean in model.members)
    assert model.model_mpp == pytest.approx(0.125)
    assert model.threshold == 0.7706
    assert model.meta["fold"] is None
    assert model.meta["member_names"] == [f"janowczyk2016/fold{k}" for k in FOLDS]
    assert model.meta["member_sha256"] == [
        pooch.file_hash(str(models.janowczyk2016_checkpoint(k))) for k in FOLDS
    ]
    assert model.meta["model_id"].startswith("janowczyk2016@")
    single = models.load_model("janowczyk2016/fold2", fetch_missing=False)
    assert len(single.members) == 1 and single.meta["fold"] == 2
    assert single.meta["model_id"] != model.meta["model_id"]
    # Members are different networks.
    w = [net.conv1.weight for net, _ in model.members]
    assert not torch.equal(w[0], w[1])


@pytest.mark.shared_data
def test_load_by_path(use_cache: Path) -> None:
    model = models.load_model(str(models.janowczyk2016_checkpoint(4)))
    assert model.name == "janowczyk2016/fold4"
    assert len(model.members) == 1


@pytest.mark.shared_data
def test_cached_model_is_shared(use_cache: Path) -> None:
    models.cached_model.cache_clear()
    try:
        a = models.cached_model("janowczyk2016/fold1")
        assert models.cached_model("janowczyk2016/fold1") is a
    finally:
        models.cached_model.cache_clear()


@pytest.mark.shared_data
def test_load_checkpoint_validation(tmp_path: Path) -> None:
    good = import_caffe(caffemodel(1), meanfile(1), tmp_path / "good.pt", name="x", fold=1)
    ckpt = torch.load(good, weights_only=True)

    other = tmp_path / "other_format.pt"
    torch.save({**ckpt, "meta": {**ckpt["meta"], "format": "something-else/9"}}, other)
    with pytest.raises(ModelError, match=re.escape(f"{other}: checkpoint format")):
        load_checkpoint(other)

    arch = tmp_path / "other_arch.pt"
    torch.save({**ckpt, "meta": {**ckpt["meta"], "arch": "resnet50"}}, arch)
    with pytest.raises(ModelError, match="other_arch.pt: network architecture is 'resnet50'"):
        load_checkpoint(arch)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="garbage.pt"):
        load_checkpoint(garbage)

    with pytest.raises(ModelError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")

    # A file of several networks (format 2) needs at least one, each with weights and a mean image.
    for name, members in (("no_members.pt", []), ("no_mean.pt", [{"state_dict": ckpt["state_dict"]}])):
        torch.save({"members": members, "meta": {**ckpt["meta"], "format": "wsi-lymph-checkpoint/2"}}, tmp_path / name)
        with pytest.raises(ModelError, match=f"{name}: members must be a non-empty list"):
            load_checkpoint_members(tmp_path / name)
    mislabelled = tmp_path / "mislabelled.pt"  # one network's keys under the format of several
    torch.save({**ckpt, "meta": {**ckpt["meta"], "format": "wsi-lymph-checkpoint/2"}}, mislabelled)
    with pytest.raises(ModelError, match="mislabelled.pt: checkpoint format is 'wsi-lymph-checkpoint/2', expected"):
        load_checkpoint_members(mislabelled)
