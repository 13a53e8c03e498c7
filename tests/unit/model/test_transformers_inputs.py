"""Inputs as transformers sees them: `BlipProcessor.from_pretrained` works on the backbone folders the project
writes (the shipped demo, a converter's output) and computes the service's pixels and token ids; transparent
images (an alpha band, a transparent palette index) are composited onto white as its processor does."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipForImageTextRetrieval, BlipProcessor

from uniadapter_serve.model.convert import merge_backbones
from uniadapter_serve.model.demo.shipped import DEMO_ROOT
from uniadapter_serve.model.loading import load_config
from uniadapter_serve.model.media.image import load_image, probe_image
from uniadapter_serve.model.preprocess import PREPROCESSOR_CONFIG, image_to_tensor
from uniadapter_serve.model.testing import randomize_
from uniadapter_serve.model.tokenizer import CAPTION_WORDS, QUESTION_WORDS, clean_text, load_tokenizer

DEMO = DEMO_ROOT / "backbone"
LIMITS = {"max_bytes": 50_000_000, "max_pixels": 40_000_000}
TEXTS = ["a large red square on the left", "What colour is the circle?", "two shapes: a star, a triangle!"]
TIGHT = 1e-6
"""max |service - transformers| in normalised units: the same uint8 pixels, float32 arithmetic"""


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def service_pixels(data: bytes, size: int) -> torch.Tensor:
    """What a task route does with an upload (service/decoding.py): probe, decode (reduced toward `size`), tensor."""
    probe = probe_image(data, declared_type="image/png", field="image", target_size=size, **LIMITS)
    return image_to_tensor(load_image(probe, size), size)


def alpha_dropped(data: bytes, size: int) -> torch.Tensor:
    """What the service computed before transparency was composited: the colour channels alone."""
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # the array: no colour key left in `info`
    return image_to_tensor(Image.fromarray(rgb), size)


def transformers_pixels(processor: BlipProcessor, data: bytes) -> torch.Tensor:
    return processor(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus noise: every channel varies, so a resize or a wrong background shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 7.0)], axis=-1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def rgba_half_alpha(width: int = 150, height: int = 110) -> Image.Image:
    """A coloured layer under alpha 128, a fully transparent saturated-green band, an opaque square."""
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., :3] = photo(width, height, seed=1)
    rgba[..., 3] = 128
    rgba[:, : width // 4] = (0, 255, 0, 0)  # what old code showed: pure green where nothing is visible
    rgba[height // 3: 2 * height // 3, width // 2: 3 * width // 4, 3] = 255
    return Image.fromarray(rgba, "RGBA")


def palette_with_transparency(width: int = 120, height: int = 90) -> Image.Image:
    """A palette image whose index 0 (bright red) is transparent and covers half the picture."""
    image = Image.fromarray(photo(width, height, seed=2)).quantize(colors=64)
    pixels = np.array(image)
    pixels[:, width // 2:] = 0
    out = Image.fromarray(pixels, "P")
    palette = image.getpalette()
    assert palette is not None
    palette[:3] = [255, 0, 0]
    out.putpalette(palette)
    out.info["transparency"] = 0
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A backbone folder written by a converter (merge_backbones of a transformers ITM folder), its tokenizer
    copied from a transformers folder that holds the demo's."""
    root = tmp_path_factory.mktemp("converted")
    config = load_config(DEMO / "config.json")
    torch.manual_seed(0)
    itm = randomize_(BlipForImageTextRetrieval(config), 1)
    itm.save_pretrained(root / "itm")
    load_tokenizer("demo", config).tokenizer.save_pretrained(str(root / "itm"))  # as the Hub's folders carry one
    merge_backbones([root / "itm"], root / "out")
    return root / "out"


@pytest.fixture(scope="module")
def converted_without_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("bare")
    torch.manual_seed(0)
    randomize_(BlipForImageTextRetrieval(load_config(DEMO / "config.json")), 1).save_pretrained(root / "itm")
    merge_backbones([root / "itm"], root / "out")
    return root / "out"


@pytest.fixture(params=["demo", "converted", "converted_without_tokenizer"])
def folder(request):
    return DEMO if request.param == "demo" else request.getfixturevalue(request.param)


def size_of(folder) -> int:
    return int(load_config(folder / "config.json").vision_config.image_size)


def test_every_written_folder_carries_a_preprocessor_config(folder):
    assert (folder / PREPROCESSOR_CONFIG).is_file()
    processor = BlipProcessor.from_pretrained(str(folder))
    assert processor.image_processor.size == {"height": size_of(folder), "width": size_of(folder)}
    assert processor.image_processor.do_convert_rgb is True


@pytest.mark.parametrize(("width", "height"), [(96, 96), (150, 110), (300, 200)])
def test_processor_pixels_are_the_services_for_rgb(folder, width, height):
    """Model size (no resize), a resize up to 3x, all below the pre-shrink threshold (4x the model size)."""
    processor = BlipProcessor.from_pretrained(str(folder))
    data = png(Image.fromarray(photo(width, height)))
    ours, theirs = service_pixels(data, size_of(folder)), transformers_pixels(processor, data)
    assert ours.shape == theirs.shape == (3, size_of(folder), size_of(folder))
    assert (ours - theirs).abs().max().item() <= TIGHT


def test_processor_tokens_are_the_services(folder):
    processor = BlipProcessor.from_pretrained(str(folder))
    service = load_tokenizer(folder, load_config(folder / "config.json"))
    for text in TEXTS:
        for words in (CAPTION_WORDS, QUESTION_WORDS):
            cleaned = clean_text(text, words)
            ids, mask = service.encode([cleaned])
            theirs = processor(text=cleaned, return_tensors="pt")
            assert theirs["input_ids"].tolist() == ids.tolist() and theirs["attention_mask"].tolist() == mask.tolist()
    tok = processor.tokenizer
    assert tok.tokenize("[ENC] a red square [DEC]") == ["[ENC]", "a", "red", "square", "[DEC]"]
    assert tok.convert_tokens_to_ids(["[ENC]", "[DEC]"]) == [service.enc_id, service.dec_id]
    assert tok.bos_token == "[DEC]" and "[ENC]" in tok.all_special_tokens
    # what the service feeds a multimodal pass: [ENC] in place of [CLS], one id, nothing split
    ids, _ = service.encode(["a red square"], mode="multimodal")
    assert ids[0].tolist() == tok("[ENC] a red square", add_special_tokens=False)["input_ids"] + [service.sep_id]


@pytest.mark.parametrize("make", [rgba_half_alpha, palette_with_transparency], ids=["rgba-128", "palette-index"])
def test_transparent_images_composite_onto_white_like_transformers(make):
    processor = BlipProcessor.from_pretrained(str(DEMO))
    image = make()
    data = png(image)
    ours, theirs = service_pixels(data, 96), transformers_pixels(processor, data)
    assert (ours - theirs).abs().max().item() <= TIGHT
    dropped = alpha_dropped(data, 96)
    assert (dropped - theirs).abs().max().item() > 1.0  # the layer under the transparency is not what counts


def test_la_and_colour_keyed_images_composite_too():
    processor = BlipProcessor.from_pretrained(str(DEMO))
    grey = Image.fromarray(photo(80, 60)[..., 0], "L")
    la = Image.merge("LA", (grey, Image.new("L", grey.size, 90)))
    keyed = Image.fromarray(photo(80, 60, seed=3))
    keyed.paste((10, 20, 30), (0, 0, 40, 60))
    for image, extra in ((la, {}), (keyed, {"transparency": (10, 20, 30)})):
        buf = io.BytesIO()
        image.save(buf, "PNG", **extra)
        data = buf.getvalue()
        assert (service_pixels(data, 96) - transformers_pixels(processor, data)).abs().max().item() <= TIGHT


@pytest.mark.parametrize("make", [rgba_half_alpha, palette_with_transparency], ids=["rgba-128", "palette-index"])
def test_large_transparent_images_are_reduced_then_composited(make):
    """Images >= 4x the model size are pre-shrunk by an integer factor (premultiplied for alpha) before the
    bicubic resize: the tensor stays within rounding of transformers' (which resizes the full image at once)."""
    processor = BlipProcessor.from_pretrained(str(DEMO))
    small = make()
    data = png(small.resize((small.width * 6, small.height * 6), Image.Resampling.NEAREST))
    probe = probe_image(data, declared_type="image/png", field="image", target_size=96, **LIMITS)
    assert min(load_image(probe, 96).size) < small.height * 6  # the pre-shrink ran
    ours, theirs = service_pixels(data, 96), transformers_pixels(processor, data)
    dropped = alpha_dropped(data, 96)
    assert (ours - theirs).abs().mean().item() < 0.02
    assert (dropped - theirs).abs().mean().item() > 0.2
