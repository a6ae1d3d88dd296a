"""minifastv.image against transformers' PIL-backend image processors (CPU, no checkpoint needed).

transformers is the oracle: CLIPImageProcessorPil (what llava-hf's preprocessor_config.json selects when the
PIL backend is asked for) and LlavaImageProcessorPil(do_pad=True) for the original LLaVA's pad-to-square.
Both exist from transformers 5.4 on. Two exceptions:
- 16-bit images, where transformers clips nearly every pixel to white: there the tests check minifastv's
  documented choice (keep the high byte, as Pillow's own 16-bit RGB PNG decoder does).
- Transparent images (RGBA, LA, P with a transparent color), where transformers changed its mind: up to 5.20
  its convert_to_rgb was Pillow's convert("RGB"), which drops alpha and shows whatever color hides under a
  transparent pixel (as the original LLaVA's Image.open(...).convert("RGB") does); from 5.21 it composites onto
  white, which is what minifastv documents. So the expected pixels are written out by hand with numpy from
  that rule (out = round(alpha / 255 * color + (1 - alpha / 255) * 255)), and transformers, given that RGB
  image, is the oracle for every later step, on any version. On 5.21+ the processor given the transparent
  image itself must also agree bit for bit; before 5.21 the tests check that it differs only by dropping alpha.
"""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minifastv.image import ImageError, ImageProcessorConfig, load_image, preprocess

REFERENCE = Path(__file__).resolve().parent.parent.parent / "shared" / "reference"
REFERENCE_CONFIG = REFERENCE / "llava-1.5-7b-hf" / "preprocessor_config.json"
LLAVA_HF_SIZES = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})  # the rest: CLIP defaults
SIZES = [(337, 200), (200, 337), (1, 1), (17, 999), (1000, 1000), (336, 336), (3, 2)]  # (width, height)
MODES = ["RGB", "RGBA", "LA", "L", "P", "P+transparency", "CMYK", "I", "F"]
HF_WHITE_SINCE = (5, 21)  # the first transformers whose convert_to_rgb composites transparency onto white (see top)


# ----------------------------------------------------------------------------------------------------
# Helpers and fixtures


@pytest.fixture(scope="module")
def clip_processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**LLAVA_HF_SIZES)


@pytest.fixture(scope="module")
def llava_pad_processor():
    from transformers import LlavaImageProcessorPil

    return LlavaImageProcessorPil(**LLAVA_HF_SIZES, do_pad=True)


def random_image(mode, width, height, seed=0):
    """A seeded random image of a Pillow mode; "P+transparency" is a palette image with a transparent color."""
    rng = np.random.default_rng(seed)
    if mode in ("P", "P+transparency"):  # random indices into a random 64-color palette
        image = Image.frombytes("P", (width, height), rng.integers(0, 64, (height, width), dtype=np.uint8).tobytes())
        image.putpalette(rng.integers(0, 256, 64 * 3, dtype=np.uint8).tobytes())
        if mode == "P+transparency":
            image.info["transparency"] = 3  # palette entry 3 is see-through, as in a GIF or PNG tRNS chunk
        return image
    if mode == "I":  # 32-bit ints, some outside 0..255 (clipped)
        return Image.fromarray(rng.integers(-50, 400, (height, width), dtype=np.int32))
    if mode == "F":  # floats, some outside 0..255 (clipped)
        return Image.fromarray(rng.uniform(-20, 300, (height, width)).astype(np.float32))
    channels = len(Image.new(mode, (1, 1)).getbands())
    values = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.frombytes(mode, (width, height), values.tobytes())


def hf_pixel_values(processor, image):
    return torch.from_numpy(np.stack(processor(image)["pixel_values"]))  # (1, 3, 336, 336)


def hf_composites_onto_white():
    """True on transformers 5.21+, whose convert_to_rgb composites transparency onto white; before: it drops alpha."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__).release[:2] >= HF_WHITE_SINCE


def is_transparent(image):
    return image.mode in ("RGBA", "LA") or image.info.get("transparency") is not None


def on_white_by_hand(image):
    """minifastv's rule for an RGBA, LA or P(+transparency) image, in numpy: each pixel over an opaque white page.

    out = round(alpha / 255 * color + (1 - alpha / 255) * 255), in integers as round((alpha * color + (255 - alpha)
    * 255) / 255): the divisor is odd, so there are no ties to break.
    """
    if image.mode == "P":  # palette indices -> colors; the transparent index (or a tRNS table) gives alpha
        index = np.array(image).astype(np.int64)
        color = np.array(image.getpalette("RGB"), dtype=np.int64).reshape(-1, 3)[index]
        transparency = image.info.get("transparency")
        if isinstance(transparency, bytes):  # one alpha per palette entry; entries past the table are opaque
            table = np.full(256, 255, dtype=np.int64)
            table[: len(transparency)] = np.frombuffer(transparency, dtype=np.uint8)
            alpha = table[index]
        else:
            alpha = np.where(index == transparency, 0, 255)
    elif image.mode == "LA":
        values = np.array(image).astype(np.int64)
        color, alpha = np.repeat(values[..., :1], 3, axis=-1), values[..., 1]
    else:
        assert image.mode == "RGBA", image.mode
        values = np.array(image).astype(np.int64)
        color, alpha = values[..., :3], values[..., 3]
    alpha = alpha[..., None]
    out = (alpha * color + (255 - alpha) * 255 + 127) // 255  # + 127 then floor: round to nearest
    return Image.fromarray(out.astype(np.uint8), "RGB")


def rgb_list(image):
    """An RGB image's pixels as a list of (r, g, b), row by row (Pillow 13 deprecates getdata)."""
    return [tuple(pixel) for pixel in np.array(image).reshape(-1, 3).tolist()]


def assert_matches_reference(processor, image, what, pad=False):
    """preprocess(image) bit for bit against transformers; a transparent image goes through the rule at the top."""
    ours = preprocess(image, pad=pad)
    if not is_transparent(image):
        assert_same(ours, hf_pixel_values(processor, image), what)
        return
    # every version: our alpha rule by hand, then transformers' resize, crop (or pad), rescale and normalize
    assert_same(ours, hf_pixel_values(processor, on_white_by_hand(image)), f"{what} (onto white by hand)")
    theirs = hf_pixel_values(processor, image)
    if hf_composites_onto_white():
        assert_same(ours, theirs, what)
    else:  # transformers <= 5.20: Pillow's convert("RGB") drops alpha; nothing else in the pipeline differs
        assert_same(theirs, hf_pixel_values(processor, image.convert("RGB")), f"{what}: transformers drops alpha")


def assert_same(ours, expected, what):
    assert ours.shape == expected.shape == (1, 3, 336, 336), f"{what}: {tuple(ours.shape)}, {tuple(expected.shape)}"
    assert ours.dtype == expected.dtype == torch.float32
    diff = (ours - expected).abs().max().item()
    assert torch.equal(ours, expected), f"{what}: max abs diff {diff}"  # bit for bit, not just within 1e-6


def write_png16(path, values, color_type):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): color_type 0 gray, 2 RGB."""
    height, width = values.shape[:2]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))  # filter byte 0 + row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


# ----------------------------------------------------------------------------------------------------
# pixel_values equal transformers'


@pytest.mark.parametrize("width, height", SIZES)
def test_every_size_matches_clip_image_processor(clip_processor, width, height):
    image = random_image("RGB", width, height, seed=width * 1000 + height)
    assert_same(preprocess(image), hf_pixel_values(clip_processor, image), f"RGB {width}x{height}")


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_matches_clip_image_processor(clip_processor, mode):
    for width, height in [(337, 200), (200, 337), (1, 1), (17, 99)]:
        image = random_image(mode, width, height, seed=width * 1000 + height)
        assert_matches_reference(clip_processor, image, f"{mode} {width}x{height}")


@pytest.mark.parametrize("mode, suffix", [("RGB", "jpg"), ("L", "jpg"), ("CMYK", "jpg"), ("RGBA", "png"),
                                          ("LA", "png"), ("P+transparency", "png"), ("I", "tiff"), ("F", "tiff")])
def test_files_match_clip_image_processor(clip_processor, tmp_path, mode, suffix):
    path = tmp_path / f"photo.{suffix}"
    random_image(mode, 401, 257).save(path)
    # transformers gets the opened PIL image: given the path, its load_image would drop alpha (see below)
    opened = Image.open(path)
    assert is_transparent(opened) == (mode in ("RGBA", "LA", "P+transparency"))  # the file kept its alpha
    assert_same(preprocess(path), preprocess(opened), f"{mode} {suffix}: path and opened image")
    assert_matches_reference(clip_processor, opened, f"{mode} {suffix}")


def test_transparent_pixels_become_white(clip_processor):
    image = Image.new("RGBA", (40, 30), (0, 0, 0, 0))  # black, but fully transparent
    config = ImageProcessorConfig()
    white = (1 - torch.tensor(config.image_mean)) / torch.tensor(config.image_std)
    black = (0 - torch.tensor(config.image_mean)) / torch.tensor(config.image_std)
    torch.testing.assert_close(preprocess(image)[0, :, 100, 100], white)
    # transformers' processor agrees from 5.21 on; before, its convert_to_rgb showed the hidden black (see top)
    theirs = hf_pixel_values(clip_processor, image)[0, :, 100, 100]
    torch.testing.assert_close(theirs, white if hf_composites_onto_white() else black)
    # surprising: transformers' load_image (used when the processor gets a path) drops alpha instead
    from transformers.image_utils import load_image as hf_load_image

    assert hf_load_image(image).getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("mode, pixels, expected", [
    # (color, alpha) -> round(alpha / 255 * color + (1 - alpha / 255) * 255), worked out by hand
    ("RGBA", [(0, 0, 0, 0), (10, 200, 30, 255), (0, 0, 0, 128), (255, 0, 100, 128), (90, 60, 30, 1)],
     [(255, 255, 255), (10, 200, 30), (127, 127, 127), (255, 127, 177), (254, 254, 254)]),
    ("LA", [(0, 0), (77, 255), (0, 128), (200, 51)],
     [(255, 255, 255), (77, 77, 77), (127, 127, 127), (244, 244, 244)]),
])
def test_partly_transparent_pixels_are_blended_onto_white(mode, pixels, expected):
    """The rule at each level of alpha, on literal values: half-transparent black is mid-gray, not black or white."""
    image = Image.new(mode, (len(pixels), 1))
    image.putdata(pixels)
    assert rgb_list(load_image(image)) == expected
    assert rgb_list(on_white_by_hand(image)) == expected  # the helper the other tests trust


def test_transparent_palette_color_becomes_white():
    image = Image.new("P", (3, 1))
    image.putpalette([250, 0, 0, 0, 250, 0, 0, 0, 250])  # index 0 red, 1 green, 2 blue
    image.putdata([0, 1, 2])
    image.info["transparency"] = 1  # green is the see-through color
    assert rgb_list(load_image(image)) == [(250, 0, 0), (255, 255, 255), (0, 0, 250)]
    # a PNG tRNS table: red half-transparent, green opaque, blue past the end of the table so opaque too
    image.info["transparency"] = bytes([128, 255])
    assert rgb_list(load_image(image)) == [(252, 127, 127), (0, 250, 0), (0, 0, 250)]
    assert rgb_list(on_white_by_hand(image)) == [(252, 127, 127), (0, 250, 0), (0, 0, 250)]


@pytest.mark.parametrize("width, height", [(337, 200), (200, 337), (336, 336), (3, 2), (1, 1), (17, 999)])
def test_pad_to_square_matches_llava_image_processor(llava_pad_processor, width, height):
    """RGB against transformers directly; RGBA: made opaque onto white first, then padded with the mean color."""
    for mode in ("RGB", "RGBA"):
        image = random_image(mode, width, height)
        assert_matches_reference(llava_pad_processor, image, f"pad {mode} {width}x{height}", pad=True)


def test_pad_fills_with_the_mean_color():
    image = Image.new("RGB", (336, 168), (255, 0, 0))  # wide: bands of padding above and below
    config = ImageProcessorConfig()
    mean, std = torch.tensor(config.image_mean), torch.tensor(config.image_std)
    mean_color = torch.tensor([122, 116, 104]) / 255  # int(mean * 255), as the original LLaVA
    pixels = preprocess(image, pad=True)[0]  # (3, 336, 336)
    torch.testing.assert_close(pixels[:, 5, 100], (mean_color - mean) / std)  # top band: padding
    torch.testing.assert_close(pixels[:, 168, 100], (torch.tensor([1.0, 0.0, 0.0]) - mean) / std)  # middle: red


def test_a_list_gives_a_batch(tmp_path):
    random_image("RGB", 500, 300).save(tmp_path / "a.png")
    batch = preprocess([tmp_path / "a.png", str(tmp_path / "a.png"), random_image("L", 50, 80)])
    assert batch.shape == (3, 3, 336, 336) and torch.equal(batch[0], batch[1])


# ----------------------------------------------------------------------------------------------------
# 16-bit images: transformers clips them to white; we keep the high byte


def test_16bit_png_keeps_the_high_byte(clip_processor, tmp_path):
    values = np.random.default_rng(0).integers(0, 65536, (200, 337), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    high_bytes = Image.fromarray((values >> 8).astype(np.uint8))  # mode L
    assert_same(preprocess(tmp_path / "gray16.png"), hf_pixel_values(clip_processor, high_bytes), "I;16 png")
    # why not transformers: Pillow's convert("RGB") clips every value above 255, so ~98% of pixels are white
    theirs = hf_pixel_values(clip_processor, Image.open(tmp_path / "gray16.png"))
    config = ImageProcessorConfig()
    white = ((1 - torch.tensor(config.image_mean)) / torch.tensor(config.image_std)).view(1, 3, 1, 1)
    assert torch.isclose(theirs, white.expand_as(theirs)).float().mean() > 0.95


def test_16bit_gray_png_equals_16bit_rgb_png(tmp_path):
    """The same choice Pillow makes: it decodes a 16-bit RGB PNG to 8-bit RGB by keeping the high byte."""
    values = np.random.default_rng(1).integers(0, 65536, (120, 90), dtype=np.uint16)
    write_png16(tmp_path / "gray16.png", values, color_type=0)
    write_png16(tmp_path / "rgb16.png", np.stack([values] * 3, axis=-1), color_type=2)
    assert Image.open(tmp_path / "rgb16.png").mode == "RGB"
    assert torch.equal(preprocess(tmp_path / "gray16.png"), preprocess(tmp_path / "rgb16.png"))


# ----------------------------------------------------------------------------------------------------
# EXIF orientation


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: the camera was turned; display rotated 90 degrees clockwise
    random_image("RGB", 64, 48).save(tmp_path / "tagged.jpg", exif=exif, quality=95)
    stored = Image.open(tmp_path / "tagged.jpg")  # Pillow decodes the stored (sideways) pixels
    assert stored.getexif()[0x0112] == 6 and stored.size == (64, 48)
    stored.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")  # ROTATE_270 = 90 clockwise
    assert load_image(tmp_path / "tagged.jpg").size == (48, 64)
    assert torch.equal(preprocess(tmp_path / "tagged.jpg"), preprocess(tmp_path / "upright.png"))


# ----------------------------------------------------------------------------------------------------
# Bad images: one ImageError sentence that names the file


def assert_one_sentence_naming(error, path):
    message = str(error.value)
    assert str(path) in message and "\n" not in message and message.endswith("."), message


def test_missing_file(tmp_path):
    with pytest.raises(ImageError) as error:
        preprocess(tmp_path / "no_such_photo.png")
    assert_one_sentence_naming(error, tmp_path / "no_such_photo.png")


def test_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("not an image\nat all\n")
    with pytest.raises(ImageError) as error:
        load_image(tmp_path / "notes.png")
    assert_one_sentence_naming(error, tmp_path / "notes.png")


def test_truncated_png(tmp_path):
    random_image("RGB", 200, 200).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as error:
        load_image(tmp_path / "cut.png")
    assert_one_sentence_naming(error, tmp_path / "cut.png")


@pytest.mark.parametrize("side", [12, 20])  # 144 pixels: Pillow only warns (over 100); 400: it raises (over 200)
def test_decompression_bomb(tmp_path, monkeypatch, side):
    random_image("RGB", side, side).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError) as error:
        load_image(tmp_path / "bomb.png")
    assert_one_sentence_naming(error, tmp_path / "bomb.png")
    assert "MAX_IMAGE_PIXELS" in str(error.value)


def test_empty_image():
    with pytest.raises(ImageError, match="empty"):
        preprocess(Image.new("RGB", (0, 5)))
    assert issubclass(ImageError, ValueError)


# ----------------------------------------------------------------------------------------------------
# Config


def test_llava_hf_config_file_gives_the_defaults():
    if not REFERENCE_CONFIG.is_file():
        pytest.skip(f"{REFERENCE_CONFIG} not present")
    assert ImageProcessorConfig.from_file(REFERENCE_CONFIG) == ImageProcessorConfig()
    assert ImageProcessorConfig.from_folder(REFERENCE_CONFIG.parent) == ImageProcessorConfig()


def test_config_keeps_known_keys_and_defaults_without_a_file(tmp_path):
    assert ImageProcessorConfig.from_folder(tmp_path) == ImageProcessorConfig()
    (tmp_path / "preprocessor_config.json").write_text(
        '{"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "image_mean": [0.5, 0.5, 0.5],'
        ' "processor_class": "LlavaProcessor", "image_processor_type": "CLIPImageProcessor"}')
    config = ImageProcessorConfig.from_folder(tmp_path)
    assert (config.shortest_edge, config.crop_height, config.crop_width) == (224, 224, 224)
    assert config.image_mean == (0.5, 0.5, 0.5) and config.image_std == ImageProcessorConfig().image_std
    assert preprocess(random_image("RGB", 300, 250), config).shape == (1, 3, 224, 224)


def test_too_elongated_image_is_refused_before_resizing():
    """Resizing a 1 x 300000 strip so its short side is 336 would need 100 million pixels: refuse, clearly."""
    from PIL import Image

    with pytest.raises(ImageError, match="too elongated"):
        preprocess(Image.new("RGB", (1, 300_000)))
