"""Natural-image videos: shapes, determinism, held-out photographs, the linear VAE, camera motion."""

import pytest
import torch

pytest.importorskip("skimage", reason="the natural-image videos need scikit-image (pip install -e '.[test]')")

from megatron_dsv.data.natural import (  # noqa: E402
    HELD_OUT_IMAGES, IMAGES, LATENT_STD, MOTIONS, LinearVAE, NaturalVideoDataset, camera_path, film, load_image,
)


@pytest.fixture(scope="module")
def train_set():
    return NaturalVideoDataset(40, (4, 8, 16), channels=4, num_classes=8, seed=3)


def test_every_listed_photograph_loads_from_the_package():
    for name in IMAGES:
        img = load_image(name)
        assert img.dim() == 3 and img.shape[0] == 3 and max(img.shape[1:]) <= 512, name
        assert 0 <= float(img.min()) and float(img.max()) <= 1 and float(img.std()) > 0.02, name
    with pytest.raises(ValueError, match="unknown photograph"):
        load_image("lena")


def test_shapes_and_determinism(train_set):
    x = train_set[7]
    assert x["latents"].shape == (4, 4, 8, 16) and x["latents"].dtype == torch.float32
    assert x["label"].dtype == torch.int64 and 0 <= int(x["label"]) < 8
    again = NaturalVideoDataset(40, (4, 8, 16), channels=4, num_classes=8, seed=3)[7]
    assert torch.equal(again["latents"], x["latents"]) and int(again["label"]) == int(x["label"])
    assert not torch.equal(train_set[8]["latents"], x["latents"])
    assert not torch.equal(NaturalVideoDataset(40, (4, 8, 16), seed=4)[7]["latents"], x["latents"])
    assert NaturalVideoDataset(2, (3, 5, 7), channels=12)[1]["latents"].shape == (12, 3, 5, 7)  # any (T, H, W), C
    with pytest.raises(IndexError):
        train_set[40]
    with pytest.raises(ValueError, match="split"):
        NaturalVideoDataset(2, (2, 4, 4), split="test")
    with pytest.raises(ValueError, match="positive"):
        NaturalVideoDataset(2, (0, 4, 4))


def test_scale_labels_and_motion(train_set):
    xs = torch.stack([train_set[i]["latents"] for i in range(40)])
    std = xs.transpose(0, 1).flatten(1).std(1)
    # whitened on the training photographs: each channel near the procedural videos' scale
    assert torch.all((std > 0.5 * LATENT_STD) & (std < 1.6 * LATENT_STD)), std
    assert abs(float(xs.mean())) < 0.2 * LATENT_STD
    labels = {int(train_set[i]["label"]) for i in range(40)}
    assert len(labels) >= 6
    # a moving camera: consecutive frames differ, but far less than frames of different videos
    step = (xs[:, :, 1:] - xs[:, :, :-1]).abs().mean()
    across = (xs[1:, :, 0] - xs[:-1, :, 0]).abs().mean()
    assert 0 < step < 0.7 * across


def test_held_out_photographs():
    train = NaturalVideoDataset(30, (2, 4, 8), seed=0)
    val = NaturalVideoDataset(30, (2, 4, 8), seed=0, split="val")
    assert {train.describe(i)["image"] for i in range(30)}.isdisjoint(HELD_OUT_IMAGES)
    assert {val.describe(i)["image"] for i in range(30)} == set(HELD_OUT_IMAGES)
    # one encoder for both: fit on the training photographs only
    assert torch.equal(train.vae.basis, val.vae.basis)
    assert {train.describe(i)["motion"] for i in range(30)} <= set(MOTIONS)


def test_linear_vae_is_an_orthogonal_whitened_projection():
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 32, 48, generator=g) for _ in range(3)]
    vae = LinearVAE.fit(imgs, channels=6, patch=4)
    assert torch.allclose(vae.basis @ vae.basis.T, torch.eye(6), atol=1e-5)
    z = vae.encode(torch.stack(imgs))
    assert z.shape == (3, 6, 8, 12)
    # on the fit data: zero mean, std LATENT_STD per channel, components decorrelated
    flat = z.transpose(0, 1).flatten(1).double()
    assert torch.allclose(flat.mean(1), torch.zeros(6, dtype=torch.float64), atol=1e-5)
    cov = torch.cov(flat) / LATENT_STD**2
    assert torch.allclose(cov, torch.eye(6, dtype=torch.float64), atol=1e-3)
    # decode is the projection's inverse on the kept components: encode(decode(z)) == z
    assert torch.allclose(vae.encode(vae.decode(z)), z, atol=1e-4)
    # ordered by variance: the full basis reconstructs exactly, fewer components lose the least
    full = LinearVAE.fit(imgs, channels=48, patch=4)
    frames = torch.stack(imgs)
    assert torch.allclose(full.decode(full.encode(frames)), frames, atol=1e-4)
    err6 = (vae.decode(z) - frames).pow(2).mean()
    err3 = (LinearVAE.fit(imgs, 3, 4).decode(LinearVAE.fit(imgs, 3, 4).encode(frames)) - frames).pow(2).mean()
    assert err6 < err3
    with pytest.raises(ValueError, match="channels"):
        LinearVAE.fit(imgs, channels=49, patch=4)
    with pytest.raises(ValueError, match="multiple of the VAE patch"):
        vae.encode(torch.rand(1, 3, 30, 32))


def test_camera_paths_move_as_named():
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    cy, cx, size = camera_path("pan_right", 5, g())
    assert torch.all(cx[1:] > cx[:-1]) and torch.all(cy == cy[0]) and torch.all(size == size[0])
    cy, cx, size = camera_path("pan_up", 5, g())
    assert torch.all(cy[1:] < cy[:-1]) and torch.all(cx == cx[0])
    _, _, size = camera_path("zoom_in", 5, g())
    assert torch.all(size[1:] < size[:-1])
    _, _, size = camera_path("zoom_out", 5, g())
    assert torch.all(size[1:] > size[:-1])
    with pytest.raises(ValueError, match="camera motion"):
        camera_path("spin", 5, g())
    # a pan of a horizontal ramp: the filmed frames brighten from one frame to the next
    ramp = torch.linspace(0, 1, 200).view(1, 1, 200).expand(3, 100, 200).contiguous()
    frames = film(ramp, "pan_right", (16, 16), 4, g())
    assert frames.shape == (4, 3, 16, 16)
    means = frames.mean(dim=(1, 2, 3))
    assert torch.all(means[1:] > means[:-1])
