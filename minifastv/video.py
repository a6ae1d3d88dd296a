"""From a video to pixel_values_videos: frames sampled uniformly, each preprocessed like an image.

Video-LLaVA sees a video as 8 frames. They are sampled as its model card does,
`np.arange(0, total_frames, total_frames / 8).astype(int)`: frame i * total / 8 for i = 0 .. 7.
Each frame then goes through the image steps of image.py at Video-LLaVA's size (short side 224,
bicubic, center crop 224, CLIP's mean and std): bit for bit what transformers' VideoLlava image
processor gives, frame by frame.

Sources:
- an animated GIF, WebP or PNG (APNG), read with Pillow;
- a folder of frames (any images Pillow reads), in the order of their names;
- an MP4, WebM, AVI, MOV or MKV file, decoded with PyAV (`pip install av`), as the model card does.

A video with fewer frames than the model samples still works: the same formula repeats frames
(3 frames give 0, 0, 0, 1, 1, 1, 2, 2), and `load_video` says so in its note.
"""

from pathlib import Path

import torch
from PIL import Image, ImageSequence

from .errors import VideoError
from .image import ImageProcessorConfig, load_image, pixel_values

PILLOW_VIDEOS = {".gif", ".webp", ".png", ".apng"}
PYAV_VIDEOS = {".mp4", ".webm", ".avi", ".mov", ".mkv"}
FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def sample_indices(total_frames, num_frames=8):
    """The model card's uniform sampling: frame i * total / num_frames, rounded down, for
    i < num_frames."""
    step = total_frames / num_frames
    return [int(i * step) for i in range(num_frames)]


def load_video(source, num_frames=8):
    """(frames, note) for a video file or a folder of frames: `num_frames` RGB PIL images
    sampled uniformly, and a sentence to show the user when the video had fewer frames than
    that (else None)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(file for file in path.iterdir() if file.suffix.lower() in FRAME_SUFFIXES)
        total = len(files)
        read = lambda indices: [load_image(files[index]) for index in indices]  # noqa: E731
    elif not path.exists():
        raise VideoError(f"Video {source} does not exist.")
    elif path.suffix.lower() in PYAV_VIDEOS:
        total, read = pyav_frames(path)
    elif path.suffix.lower() in PILLOW_VIDEOS:
        total, read = pillow_frames(path)
    else:
        known = ", ".join(sorted(PILLOW_VIDEOS | PYAV_VIDEOS))
        raise VideoError(
            f"Video {source} is neither a folder of frames nor a known video file ({known})."
        )
    if total == 0:
        raise VideoError(f"Video {source} has no frames.")
    indices = sample_indices(total, num_frames)
    note = None
    if total < num_frames:
        note = (
            f"note: {source} has {total} frame(s), fewer than the {num_frames} the model samples: "
            f"frames {', '.join(map(str, indices))} are used (uniform sampling repeats them)."
        )
    return read(indices), note


def pillow_frames(path):
    """(number of frames, a reader of frames by index) for an animated GIF, WebP or PNG."""

    # Pillow reads the frames lazily, from the open file: a damaged frame fails here
    def with_open(use):
        try:
            with Image.open(path) as image:
                return use(image)
        # not an image, cut short
        except (OSError, ValueError, EOFError, Image.DecompressionBombError) as error:
            raise VideoError(
                f"Video {path} cannot be read ({' '.join(str(error).split())})."
            ) from None

    def read(indices):  # each frame as shown, the earlier frames' disposal applied
        return with_open(lambda image: [
            load_image(frame.copy())
            for index, frame in enumerate(ImageSequence.Iterator(image))
            for _ in range(indices.count(index))
        ])

    return with_open(lambda image: getattr(image, "n_frames", 1)), read


def pyav_frames(path):
    """(number of frames, a reader of frames by index) for a video file, through PyAV, as the model
    card reads it."""
    try:
        import av
    except ImportError:
        raise VideoError(
            f"Reading {path.suffix} videos needs the PyAV package: pip install av (or give an "
            "animated GIF or WebP, or a folder of frames)."
        ) from None
    try:
        with av.open(str(path)) as container:
            total = (container.streams.video[0].frames
                     or sum(1 for _ in container.decode(video=0)))
    except (av.FFmpegError, IndexError) as error:  # not a video, or no video stream
        reason = " ".join(str(error).split()) or "no video stream"
        raise VideoError(f"Video {path} cannot be read ({reason}).") from None

    def read(indices):
        frames, index = [], -1
        with av.open(str(path)) as container:
            # decode in order, keep the sampled ones
            for index, frame in enumerate(container.decode(video=0)):
                if index > indices[-1]:
                    break
                frames += [load_image(frame.to_image())] * indices.count(index)
        if len(frames) < len(indices):  # the stream said it had more frames than it decoded
            raise VideoError(
                f"Video {path} ended after {index + 1} frames, before frame {indices[-1]}."
            )
        return frames

    return total, read


def preprocess_video(frames, config=None):
    """(num_frames, 3, 224, 224) float32 for the frames of one video: each frame as image.py
    prepares an image."""
    config = config or ImageProcessorConfig(shortest_edge=224, crop_height=224, crop_width=224)
    return torch.stack([pixel_values(frame, config) for frame in frames])
