"""Training-patch extraction on the three real annotated crops (20x, 0.5 µm/px), converted to the paper's layout."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import write_crops_in_paper_layout
from scipy.spatial import cKDTree

from wsi_lymph.training.dataset import read_dataset
from wsi_lymph.training.patches import (
    NEGATIVE_ROTATIONS,
    POSITIVE_ROTATIONS,
    export_png,
    extract_image_patches,
    extract_patches,
    gaussian_nb_posterior,
    mean_image_bgr,
    open_patches,
    patch_names,
    positive_weight,
    upscale_image,
)

SMALL = {"max_positive": 40, "max_negative": 30}  # keeps the Zarr/Dask tests fast; the rules do not change


@pytest.fixture(scope="module")
def paper_dir(tmp_path_factory):
    """The real crops written as ``im<K>.tif`` + ``<K>m.tif`` (RGBA, centres in alpha)."""
    return write_crops_in_paper_layout(tmp_path_factory.mktemp("paper"))


@pytest.fixture(scope="module")
def images(paper_dir):
    return read_dataset(paper_dir)


@pytest.fixture(scope="module")
def full(images):
    """Every crop at the paper's defaults (2,000 positive / 4,000 negative locations)."""
    return {image.image_id: extract_image_patches(image, seed=7) for image in images}


@pytest.mark.shared_data
def test_mean_image_bgr_is_caffe_layout_and_chunk_independent():
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, size=(300, 32, 32, 3), dtype=np.uint8)
    expected = patches.astype(np.float64).mean(axis=0)[..., ::-1].transpose(2, 0, 1)
    for chunk in (7, 300, 8192):
        mean = mean_image_bgr(patches, chunk=chunk)
        assert mean.shape == (3, 32, 32) and mean.dtype == np.float32
        np.testing.assert_allclose(mean, expected, rtol=0, atol=1e-4)
    where = np.arange(300) % 3 == 0
    np.testing.assert_allclose(mean_image_bgr(patches, chunk=16, where=where),
                               patches[where].astype(np.float64).mean(0)[..., ::-1].transpose(2, 0, 1), atol=1e-4)
    assert mean_image_bgr(np.full((2, 32, 32, 3), [10, 20, 30], np.uint8))[:, 0, 0].tolist() == [30, 20, 10]
    with pytest.raises(ValueError):
        mean_image_bgr(patches, where=np.zeros(300, bool))


def test_gaussian_naive_bayes_posterior():
    rng = np.random.default_rng(1)
    x0 = rng.normal([0.2, 0.3, 0.4], 0.05, size=(900, 3))
    x1 = rng.normal([0.6, 0.3, 0.2], 0.05, size=(100, 3))
    x = np.vstack([x0, x1])
    y = np.r_[np.zeros(900, bool), np.ones(100, bool)]
    post = gaussian_nb_posterior(x, y, np.array([[0.2, 0.3, 0.4], [0.6, 0.3, 0.2], [0.4, 0.3, 0.3]]))
    assert post[0] < 1e-6 and post[1] > 1 - 1e-6
    # Hand-computed posterior at the midpoint from the fitted per-class means/variances and priors.
    point = np.array([0.4, 0.3, 0.3])
    eps = 1e-9 * x.var(0).max()

    def log_joint(xs, prior):
        mean, var = xs.mean(0), xs.var(0) + eps
        return np.log(prior) - 0.5 * np.sum(np.log(2 * np.pi * var) + (point - mean) ** 2 / var)

    l0, l1 = log_joint(x0, 0.9), log_joint(x1, 0.1)
    assert post[2] == pytest.approx(1 / (1 + np.exp(l0 - l1)), rel=1e-9)
    assert gaussian_nb_posterior(x, np.zeros(1000, bool), x[:5]).tolist() == [0.0] * 5
    # One positive sample: variance smoothing keeps the model finite.
    one = gaussian_nb_posterior(x, np.r_[np.zeros(999, bool), True], x[-1:])
    assert np.isfinite(one).all() and one[0] > 0.5


@pytest.mark.shared_data
def test_counts_rotations_and_patch_geometry_at_defaults(images, full):
    for image in images:
        ps = full[image.image_id]
        stats = ps.stats
        n_pos, n_neg = stats["positive_locations"], stats["negative_locations"]
        # Positives: 2,000 draws (with replacement, as the original) x 4 rotations.
        assert n_pos == 2000 and (ps.kind == 1).sum() == 4 * n_pos == 8000
        # Negatives: up to 2 x 2,000 = 4,000 locations x 2 rotations; on a 100 x 100 crop the naive Bayes
        # candidates run out first (taking fewer is the original's behaviour).
        assert 0 < n_neg <= 4000 and (ps.kind == 0).sum() == 2 * n_neg <= 8000
        assert len(ps) == 4 * n_pos + 2 * n_neg
        assert ps.patches.shape == (len(ps), 32, 32, 3) and ps.patches.dtype == np.uint8
        assert ps.center_rc.dtype == np.int32 and ps.rotation_deg.dtype == np.uint16
        np.testing.assert_array_equal(ps.label, ps.kind)
        assert ps.label[: 4 * n_pos].all() and not ps.label[4 * n_pos :].any()

        up = upscale_image(image.rgb, 4)
        expected_u8 = np.floor(np.clip(up, 0, 255) + 0.5).astype(np.uint8)
        padded = np.pad(expected_u8, ((32, 32), (32, 32), (0, 0)), mode="symmetric")
        window = np.lib.stride_tricks.sliding_window_view(padded, (32, 32), axis=(0, 1))  # (r, c, 3, 32, 32)
        for kind, rotations, count in ((1, POSITIVE_ROTATIONS, n_pos), (0, NEGATIVE_ROTATIONS, n_neg)):
            rows = ps.kind == kind
            k = len(rotations)
            # Each location (1 ... count) appears exactly at the required rotations, at one centre.
            np.testing.assert_array_equal(ps.location_index[rows], np.repeat(np.arange(1, count + 1), k))
            np.testing.assert_array_equal(ps.rotation_deg[rows], np.tile(rotations, count))
            centers = ps.center_rc[rows].reshape(count, k, 2)
            assert (centers == centers[:, :1]).all()
            assert (centers >= 0).all() and (centers < np.array(up.shape[:2])).all()
            patches = ps.patches[rows].reshape(count, k, 32, 32, 3)
            r, c = centers[:, 0, 0], centers[:, 0, 1]
            # Rotation 0 is the 32 x 32 window whose 0-based (16, 16) is the location's pixel ...
            np.testing.assert_array_equal(patches[:, 0], window[r + 16, c + 16].transpose(0, 2, 3, 1))
            np.testing.assert_array_equal(patches[:, 0, 16, 16], expected_u8[r, c])
            # ... and every other rotation is np.rot90 (counter-clockwise) of it.
            for j, rot in enumerate(rotations):
                np.testing.assert_array_equal(patches[:, j], np.rot90(patches[:, 0], k=rot // 90, axes=(1, 2)))


@pytest.mark.shared_data
def test_positive_locations_lie_in_the_upscaled_blob_of_a_real_centre(images, full):
    for image in images:
        ps = full[image.image_id]
        weight = positive_weight(image.rgb.shape[:2], image.centers_rc, 4)
        pos = ps.center_rc[ps.kind == 1][:: len(POSITIVE_ROTATIONS)]
        assert (weight[pos[:, 0], pos[:, 1]] > 0).all()
        # Distance (Chebyshev, upscaled px) to the nearest 4 x centre + 1.5 (where the centre pixel maps to).
        blob_centres = 4 * image.centers_rc + 1.5
        cheb = np.abs(pos[:, None, :] - blob_centres[None]).max(axis=2).min(axis=1)
        assert cheb.max() <= 7.5  # the kernel's support: +-2 input px
        assert (cheb <= 2.5).mean() > 0.7  # weight-proportional draws favour the main lobe ...
        assert (cheb <= 3.5).mean() > 0.8  # ... (the central 8 x 8 px)
        # Every real centre contributes positives.
        nearest = np.abs(pos[:, None, :] - blob_centres[None]).max(axis=2).argmin(axis=1)
        assert set(nearest.tolist()) == set(range(len(image.centers_rc)))


@pytest.mark.shared_data
def test_negatives_avoid_positives_and_each_other(images, full):
    for image in images:
        ps = full[image.image_id]
        positive = positive_weight(image.rgb.shape[:2], image.centers_rc, 4) > 0
        neg = ps.center_rc[ps.kind == 0][:: len(NEGATIVE_ROTATIONS)].astype(np.int64)
        assert not positive[neg[:, 0], neg[:, 1]].any()
        distance, _ = cKDTree(np.argwhere(positive)).query(neg)
        assert distance.min() > 5  # no negative within 5 px (model frame) of a positive pixel
        assert np.all(np.diff(distance) <= 1e-9)  # taken farthest-first
        # Each location taken clears a disk of radius 5 (d^2 <= 25) around it.
        pairs = cKDTree(neg).query_pairs(5.0)
        assert not pairs
    # The original rule (no exclusion) only keeps negatives off the positive pixels themselves.
    image = images[0]
    ps = extract_image_patches(image, seed=7, min_positive_distance_px=0)
    positive = positive_weight(image.rgb.shape[:2], image.centers_rc, 4) > 0
    neg = ps.center_rc[ps.kind == 0]
    distance = cKDTree(np.argwhere(positive)).query(neg)[0]
    assert distance.min() >= 1 and (distance <= 5).any()


@pytest.mark.shared_data
def test_same_seed_same_patches_other_seed_other_patches(images, full):
    image = images[1]
    again = extract_image_patches(image, seed=7)
    reference = full[image.image_id]
    for name in ("patches", "label", "kind", "rotation_deg", "center_rc", "location_index"):
        np.testing.assert_array_equal(getattr(again, name), getattr(reference, name))
    other = extract_image_patches(image, seed=8)
    assert not np.array_equal(other.center_rc[: 4 * 2000], reference.center_rc[: 4 * 2000])
    distinct = extract_image_patches(image, seed=7, positive_replacement=False, **SMALL)
    pos = distinct.center_rc[distinct.kind == 1][::4]
    assert len(np.unique(pos, axis=0)) == len(pos) == SMALL["max_positive"]


def _read_all(path):
    group, attrs = open_patches(path)
    return {name: np.asarray(group[name][:]) for name in group.array_keys()}, attrs


@pytest.mark.shared_data
def test_dask_cluster_gives_the_same_zarr_as_in_process(images, paper_dir, tmp_path):
    from distributed import Client, LocalCluster, get_task_stream

    local = extract_patches(None, paper_dir, tmp_path / "local", seed=3, chunk=64, **SMALL)
    assert local == tmp_path / "local" / "patches.zarr"
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
        get_task_stream(client) as stream,
    ):
        remote = extract_patches(client, images, tmp_path / "remote.zarr", seed=3, chunk=64, **SMALL)
    keys = {str(task["key"]) for task in stream.data}
    assert len([key for key in keys if key.startswith("patches-")]) == 3
    assert remote == tmp_path / "remote.zarr" and not (tmp_path / "remote.zarr.partial").exists()
    a, attrs_a = _read_all(local)
    b, attrs_b = _read_all(remote)
    assert set(a) == {"patches", "label", "kind", "rotation_deg", "center_rc", "image_index", "location_index"}
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert attrs_a == attrs_b
    group = zarr.open_group(str(local), mode="r")
    assert group["patches"].chunks == (64, 32, 32, 3) and group["patches"].dtype == np.uint8
    assert group["center_rc"].dtype == np.int32 and group["image_index"].dtype == np.int32
    assert attrs_a["image_ids"] == ["1", "2", "3"] and attrs_a["name_prefixes"] == ["im1", "im2", "im3"]
    assert attrs_a["seed"] == 3 and attrs_a["params"]["max_positive"] == 40
    n = len(a["label"])
    assert n == sum(c["positive_patches"] + c["negative_patches"] for c in attrs_a["counts"].values())
    for index, image in enumerate(images):
        direct = extract_image_patches(image, seed=3, **SMALL)
        rows = a["image_index"] == index
        np.testing.assert_array_equal(a["patches"][rows], direct.patches)
        np.testing.assert_array_equal(a["center_rc"][rows], direct.center_rc)


@pytest.mark.shared_data
def test_output_is_replaced_atomically_and_foreign_folders_are_kept(images, tmp_path):
    target = tmp_path / "p.zarr"
    extract_patches(None, images[:1], target, seed=1, **SMALL)
    first = _read_all(target)[0]["patches"]
    extract_patches(None, images[:1], target, seed=2, **SMALL)
    assert not np.array_equal(first, _read_all(target)[0]["patches"])
    assert [p.name for p in tmp_path.iterdir()] == ["p.zarr"]
    foreign = tmp_path / "data.zarr"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        extract_patches(None, images[:1], foreign, seed=1, **SMALL)
    assert (foreign / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="unique"):
        extract_patches(None, [images[0], images[0]], tmp_path / "dup.zarr", seed=1, **SMALL)


@pytest.mark.shared_data
def test_png_export_uses_the_paper_names(images, tmp_path):
    from PIL import Image

    group_path = extract_patches(None, images[:2], tmp_path / "p.zarr", seed=5, max_positive=3, max_negative=2)
    count = export_png(group_path, tmp_path / "subs")
    group, attrs = open_patches(group_path)
    names = patch_names(group, attrs)
    assert count == len(names) == len(set(names))
    assert sorted(p.name for p in (tmp_path / "subs").iterdir()) == sorted(names)
    assert names[:4] == ["im1_1_p_1_0.png", "im1_1_p_1_90.png", "im1_1_p_1_180.png", "im1_1_p_1_270.png"]
    assert "im1_0_n_1_0.png" in names and "im1_0_n_1_90.png" in names and "im2_1_p_3_270.png" in names
    patches = np.asarray(group["patches"][:])
    for i in (0, 5, len(names) - 1):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "subs" / names[i])), patches[i])
