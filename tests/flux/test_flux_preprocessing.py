"""FLUX subjects are prepared exactly as the authors' release prepares them.

The release's code is written out again below, independently of ``anystory.flux.release_inputs``: the app's
``image_matting`` (given mask, or alpha channel) and ``generate()``'s encoders (``encode_redux_maybe_with_router_
condition``, ``encode_ref_condition``) with a soft mask as given. On the same inputs the references must be
pixel-identical and the encoders' outputs equal.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from anystory import Subject
from anystory.flux.release_inputs import prepare_release_subjects
from helpers.flux_pipe import make_pipe


def app_image_matting(pil_image, pil_mask):
    """``app.py::image_matting`` of the release, for a given mask or an alpha channel (no matting model)."""
    if pil_mask is not None:
        mask = ((np.array(pil_mask) > 200) * 255).astype(np.uint8)
    else:
        mask = ((np.array(pil_image)[..., -1] > 200) * 255).astype(np.uint8)
    nz = np.nonzero(mask)
    min_x, max_x, min_y, max_y = np.min(nz[1]), np.max(nz[1]), np.min(nz[0]), np.max(nz[0])
    cx, cy = (min_x + max_x) // 2, (min_y + max_y) // 2
    s = max(max_x - min_x, max_y - min_y) * 1.04
    min_x, min_y = cx - s // 2, cy - s // 2
    box = (min_x, min_y, min_x + s, min_y + s)
    pil_image = pil_image.convert("RGB").crop(box)
    pil_mask = Image.fromarray(mask).crop(box)
    np_image, np_mask = np.array(pil_image), np.array(pil_mask)[..., None] / 255.
    return Image.fromarray((np_mask * np_image + (1 - np_mask) * 255.).astype(np.uint8)), pil_mask


def random_case(rng, soft: bool):
    w, h = rng.randint(12, 72, size=2)
    image = Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))
    yy, xx = np.mgrid[:h, :w]
    cx, cy = rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h  # sometimes past the border
    rx, ry = rng.uniform(0.15, 0.6) * w, rng.uniform(0.15, 0.6) * h
    d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    if soft:
        values = np.clip((1.3 - d) / rng.uniform(0.2, 0.8), 0, 1) * 255  # a ramp of width 0.2-0.8 radii
    else:
        values = (d < 1) * 255.0
    values = values.astype(np.uint8)
    if not (values > 200).any():
        values[h // 2, w // 2] = 255
    return image, Image.fromarray(values, "L")


@pytest.mark.parametrize("soft", [True, False])
def test_app_preprocessing_is_pixel_identical_on_100_random_masks(soft):
    rng = np.random.RandomState(7 + soft)
    area_ratio = []
    for _ in range(100):
        image, mask = random_case(rng, soft)
        expected_image, expected_mask = app_image_matting(image, mask)
        (ours,) = prepare_release_subjects([Subject(image, mask)], 4, None, "app")
        assert ours.image.size == expected_image.size
        np.testing.assert_array_equal(np.asarray(ours.image), np.asarray(expected_image))
        np.testing.assert_array_equal(ours.mask_values, np.asarray(expected_mask))
        np.testing.assert_array_equal(ours.mask, np.asarray(expected_mask) > 0)
        values = np.asarray(mask)
        area_ratio.append((values > 127).sum() / max((values > 200).sum(), 1))
    if soft:  # the threshold matters on these masks: at > 127 the subject would be larger
        assert np.mean(area_ratio) > 1.05


def test_alpha_channel_is_the_mask_at_the_app_threshold():
    rng = np.random.RandomState(3)
    for _ in range(20):
        image, mask = random_case(rng, soft=True)
        rgba = image.convert("RGBA")
        rgba.putalpha(mask)
        expected_image, expected_mask = app_image_matting(rgba, None)
        (ours,) = prepare_release_subjects([Subject(rgba)], 4, None, "app")
        np.testing.assert_array_equal(np.asarray(ours.image), np.asarray(expected_image))
        np.testing.assert_array_equal(ours.mask_values, np.asarray(expected_mask))


def test_a_mask_with_nothing_above_the_threshold_is_refused():
    image = Image.new("RGB", (16, 16), (10, 20, 30))
    mask = Image.fromarray(np.full((16, 16), 150, np.uint8))
    mask.putpixel((3, 3), 0)
    with pytest.raises(ValueError, match="above 200"):
        prepare_release_subjects([Subject(image, mask)], 4, None, "app")
    with pytest.raises(ValueError, match="subject_preprocessing"):
        prepare_release_subjects([Subject(image, mask)], 4, None, "crop")


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def release_encode(pipe, image, mask):
    """``generate()``'s encoders on one subject, as the release writes them (reference noise: global RNG)."""
    fe, enc = pipe.feature_extractor, pipe.image_encoder
    pixels = fe.preprocess(images=image.convert("RGB"), return_tensors="pt").pixel_values
    m = fe.preprocess(images=mask.convert("RGB"), resample=0, do_normalize=False, return_tensors="pt").pixel_values
    feats = enc(pixels * m).last_hidden_state
    m = m.mean(dim=1, keepdim=True)
    s = enc.config.image_size // enc.config.patch_size  # (vision_model.embeddings in the transformers it used)
    m = (F.adaptive_avg_pool2d(m, output_size=(s, s)) > 0).float().flatten(2).transpose(1, 2)
    redux, router = pipe.redux_embedder(feats, m), pipe.router_embedder(feats, m)
    size = pipe.reference_size
    ref = pipe.image_processor.preprocess(image.convert("RGB"), height=size, width=size)
    rm = torch.from_numpy(np.array(mask.convert("L").resize((size, size), resample=0))).float() / 255.0
    rm = rm[None, None]
    latent = pipe.vae.encode(ref * rm).latent_dist.sample()
    latent = (latent - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    packed = pipe._pack_latents(latent, *latent.shape)
    s = latent.shape[-1] // 2
    token_mask = (F.adaptive_avg_pool2d(rm, output_size=(s, s)) > 0).flatten(1)
    return redux, router, packed, token_mask


def test_soft_masks_as_given_encode_as_the_release_generate(pipe):
    """``subject_preprocessing="none"``: no threshold, no crop, the soft mask's values multiply the image; with
    ``reference_noise="release"`` the VAE posterior noise is the release's too (global RNG seeded by the seed)."""
    rng = np.random.RandomState(11)
    cases = [random_case(rng, soft=True) for _ in range(3)]
    prepared = prepare_release_subjects([Subject(i, m) for i, m in cases], 4, None, "none")
    assert any(0 < v < 255 for p in prepared for v in np.unique(p.mask_values))  # soft values reach the encoders
    with torch.no_grad():
        ours = pipe.encode_subjects(prepared, "cpu", torch.Generator().manual_seed(5), reference_noise="release")
        torch.manual_seed(5)
        expected = [release_encode(pipe, i, m) for i, m in cases]
    for k, name in enumerate(("redux", "router", "ref_latents", "ref_mask")):
        torch.testing.assert_close(ours[name], torch.cat([e[k] for e in expected]).to(ours[name].dtype),
                                   rtol=0, atol=0)
    # the default draws from a CPU generator of the call's seed and leaves the global RNG alone (on a CPU the
    # two streams coincide; on a GPU "release" draws from the GPU's global RNG, as the release does)
    torch.manual_seed(123)
    with torch.no_grad():
        call = pipe.encode_subjects(prepared, "cpu", torch.Generator().manual_seed(5))
    after_call = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after_call, torch.rand(1))
    torch.testing.assert_close(call["ref_latents"], ours["ref_latents"], rtol=0, atol=0)
    with torch.no_grad():  # "release" leaves the global RNG where the release's generate() leaves it
        pipe.encode_subjects(prepared, "cpu", torch.Generator().manual_seed(5), reference_noise="release")
        after_release = torch.rand(1)
        torch.manual_seed(5)
        [release_encode(pipe, i, m) for i, m in cases]
    assert torch.equal(after_release, torch.rand(1)) and not torch.equal(after_release, after_call)


def test_app_mode_reaches_the_encoders_binary(pipe):
    rng = np.random.RandomState(12)
    image, mask = random_case(rng, soft=True)
    (p,) = pipe.check_subjects([Subject(image, mask)])
    assert set(np.unique(p.mask_values)) <= {0, 255}
    expected_image, expected_mask = app_image_matting(image, mask)
    torch.manual_seed(0)
    with torch.no_grad():
        ours = pipe.encode_subjects([p], "cpu", torch.Generator().manual_seed(0), reference_noise="release")
        torch.manual_seed(0)
        expected = release_encode(pipe, expected_image, expected_mask)
    for k, name in enumerate(("redux", "router", "ref_latents", "ref_mask")):
        torch.testing.assert_close(ours[name], expected[k].to(ours[name].dtype), rtol=0, atol=0)
