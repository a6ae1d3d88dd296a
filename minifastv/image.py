"""From a photo to pixel_values: llava-hf's CLIPImageProcessor in Pillow and torch.

Convert to RGB, resize the short side to 336 (bicubic), cut the center 336 x 336, rescale 0..255 to
0..1, normalize with CLIP's mean and std: bit for bit what transformers' CLIPImageProcessorPil
gives. `pad=True` pads to a square instead of cropping, like the original LLaVA
(LlavaImageProcessorPil, do_pad=True).

Choices where a real file can surprise:
- EXIF orientation is applied: a phone stores a portrait photo sideways plus a tag
  "rotate 90 degrees"; we rotate, so the model sees what the person saw (transformers' load_image
  does too, but its image processor, handed a PIL image, does not).
- Transparent pixels (RGBA, LA, P with a transparent color) become white, as in transformers'
  convert_to_rgb since 5.21; Pillow's plain convert("RGB") shows whatever color hides under
  them, often black (the original LLaVA code and transformers up to 5.20 do that). LLaVA's
  training images have no alpha, so neither is what it was trained on: white is what a person
  sees in an image viewer.
- 16-bit images (I;16: 16-bit grayscale PNG or TIFF) keep their high byte (value // 256), as
  Pillow does when it opens a 16-bit RGB PNG. Pillow's convert("RGB"), and so transformers, clips
  at 255: all white. 32-bit integer (I) and float (F) images have no fixed range: like
  transformers we clip them to 0..255.
"""

import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .checkpoint import read_json
from .errors import CheckpointError, ImageError


@dataclass
class ImageProcessorConfig:
    """llava-hf's preprocessor_config.json. The defaults are LLaVA-1.5's values."""

    # resize so the short side has this length (the file's size.shortest_edge)
    shortest_edge: int = 336
    # then keep the center crop_height x crop_width: the input of CLIP ViT-L/14-336
    crop_height: int = 336
    crop_width: int = 336
    resample: int = 3  # Pillow's filter number: 3 = bicubic
    rescale_factor: float = 1 / 255  # 0..255 -> 0..1
    # R, G, B: CLIP's training statistics
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_file(cls, path):
        """Read a preprocessor_config.json, keeping only the keys this class knows;
        CheckpointError if it is broken."""
        values = read_json(path)
        try:
            values.update(values.pop("size", {}))  # {"shortest_edge": 336}
            values.update(
                {f"crop_{key}": value for key, value in values.pop("crop_size", {}).items()}
            )
        except (AttributeError, TypeError, ValueError):
            raise CheckpointError(
                f"{path} does not describe an image processor: size and crop_size must be objects."
            ) from None
        names = {f.name for f in fields(cls)}
        config = cls(**{key: tuple(v) if isinstance(v, list) else v
                        for key, v in values.items() if key in names})
        sizes = (config.shortest_edge, config.crop_height, config.crop_width)
        statistics = (*config.image_mean, *config.image_std, config.rescale_factor)
        if (not all(isinstance(size, int) and size > 0 for size in sizes)
                or len(config.image_mean) != 3 or len(config.image_std) != 3
                or not all(isinstance(value, (int, float)) for value in statistics)
                or 0 in config.image_std):
            raise CheckpointError(
                f"{path} does not describe an image processor: sizes must be positive integers, "
                "image_mean and image_std three numbers each."
            )
        return config

    @classmethod
    def from_folder(cls, folder):
        """The config of a checkpoint folder, or LLaVA-1.5's defaults if it has no
        preprocessor_config.json."""
        path = Path(folder) / "preprocessor_config.json"
        return cls.from_file(path) if path.is_file() else cls()


def open_image_file(path):
    """Decode the file now (Pillow reads lazily), so that every failure becomes one
    ImageError sentence."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that: we refuse both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
    except FileNotFoundError:
        raise ImageError(f"Image file {path} does not exist.") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        limit = (f"Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}, "
                 "a guard against decompression bombs")
        raise ImageError(
            f"Image file {path} has more pixels than Pillow allows ({limit})."
        ) from None
    except Exception as error:  # not an image, truncated data, a broken chunk, a folder...
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ImageError(f"Image file {path} cannot be read as an image ({reason}).") from error
    return image


def load_image(source):
    """An RGB PIL image from a path or a PIL image: EXIF rotation applied, alpha and 16-bit
    handled (see top)."""
    image = source if isinstance(source, Image.Image) else open_image_file(source)
    if image.width == 0 or image.height == 0:  # nothing to resize
        # Pillow keeps the path of the file it opened
        name = getattr(image, "filename", "") or source
        raise ImageError(f"Image {name} is empty ({image.width} x {image.height} pixels).")
    image = ImageOps.exif_transpose(image)  # a copy, upright as the camera's EXIF tag says
    if image.mode.startswith("I;16"):  # 16-bit: keep the high byte (value // 256)
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # Transparent pixels become white, as in transformers' convert_to_rgb
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")


def pad_to_square(image, color):
    """The original LLaVA's "pad" mode: the image centered on a square of `color`; nothing
    is cut off later."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), color)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


def resize_shortest_edge(image, shortest_edge, resample):
    """Resize so the short side is `shortest_edge`; the long side keeps the aspect
    ratio, rounded down."""
    short, long = sorted(image.size)
    # transformers' get_resize_output_image_size, to the pixel
    long = int(shortest_edge * long / short)
    # a 1 x 100000 strip, say
    if Image.MAX_IMAGE_PIXELS and shortest_edge * long > Image.MAX_IMAGE_PIXELS:
        raise ImageError(
            f"An image of {image.width} x {image.height} pixels is too elongated: with its short "
            f"side at {shortest_edge} it would have {shortest_edge * long} pixels; crop it first."
        )
    # (width, height)
    size = (shortest_edge, long) if image.width <= image.height else (long, shortest_edge)
    return image.resize(size, resample=resample)


def center_crop(image, height, width):
    """The middle height x width of the image: a wide photo loses its left and right edges."""
    # odd leftovers go right / bottom
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def pixel_values(image, config, pad=False):
    """One RGB PIL image -> (3, crop_height, crop_width) float32, the steps of
    CLIPImageProcessorPil."""
    if pad:
        image = pad_to_square(
            image, tuple(int(mean * 255) for mean in config.image_mean)  # (122, 116, 104)
        )
    if config.do_resize:
        image = resize_shortest_edge(image, config.shortest_edge, config.resample)
    if config.do_center_crop:
        image = center_crop(image, config.crop_height, config.crop_width)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(image.height, image.width, 3).permute(2, 0, 1).float()  # (3, H, W), 0..255
    # multiply in float64, then round to float32: transformers' order, same bits
    if config.do_rescale:
        pixels = (pixels.double() * config.rescale_factor).float()
    if config.do_normalize:  # per channel: zero mean and unit variance over CLIP's training images
        mean = torch.tensor(config.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(config.image_std, dtype=torch.float32).view(3, 1, 1)
        pixels = (pixels - mean) / std
    return pixels


def preprocess(images, config=None, pad=False):
    """pixel_values (N, 3, 336, 336) float32 for a path, a PIL image, or a list of them."""
    config = config or ImageProcessorConfig()
    if not isinstance(images, (list, tuple)):
        images = [images]
    # (N, 3, H, W)
    return torch.stack([pixel_values(load_image(image), config, pad) for image in images])
