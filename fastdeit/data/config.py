"""The `data` config section: what the input pipeline reads and how it augments.

Defaults are the DeiT recipe (docs/DESIGN.md, "train augmentation" and "evaluation" rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_LARGEST_IMAGE = (5980, 6430)   # width, height: NVIDIA's figure for its largest JPEG


@dataclass
class DataConfig:
    root: str = "data/demo"            # holds <train_split>/ and <val_split>/ in class-folder layout,
                                       # or packed (python -m fastdeit.data.pack; detected)
    # Node-local folder to copy the data to once per node before training (stage.py): local rank 0
    # copies data.root's splits to <stage_to>/<name of root>, checked against the manifest's
    # checksums; a complete copy is reused, a partial one resumed. $VARS are expanded on each node
    # (e.g. $SLURM_TMPDIR). null: read data.root directly.
    stage_to: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    # Optional file lists (text, one image path per line, relative to the split folder, e.g.
    # "n01440764/x.JPEG"): read only those images. Labels still come from the class folders
    # (sorted folder names, as ImageFolder), so a subset keeps the full set's label indices.
    train_list: Optional[str] = None
    val_list: Optional[str] = None
    # Images to leave out of both splits: the list `python -m fastdeit.data.verify ROOT` writes
    # (one path per line relative to root, e.g. "train/n01440764/x.JPEG"). Unset: ROOT's own
    # verify_excluded.txt, where the verifier writes by default, when it exists.
    exclude_list: Optional[str] = None
    # The model's native size (its position-embedding grid), the evaluation crop side, and the
    # training crop side when size_schedule is null.
    img_size: int = 224
    # Training resolution per epoch (schedule.py): [[epoch, size], ...] milestones, 0-based
    # epochs, linear in between, rounded to size_multiple as size_rounding says; before the
    # first milestone its size, after the last the last size. E.g. [[10, 160], [250, 224]]
    # (a ramp; FFCV's resolution section is [[start_ramp, min_res], [end_ramp, max_res]]) or
    # [[279, 192], [280, 224]] (DeiT III-style: 192 px, then 224 px for the last 20 of 300).
    # The student keeps its position embedding at img_size's grid and resamples it per forward.
    size_schedule: Optional[List[Tuple[int, int]]] = None
    size_multiple: Optional[int] = None  # None: 2 x the student's patch size (32 for /16), 32 for convnets
    # nearest: FFCV's get_resolution (ramp sizes to the nearest multiple, ties to even;
    # milestone sizes as written, which must be multiples); floor: every size rounded down.
    size_rounding: str = "nearest"
    eval_crop_pct: float = 0.875       # eval resize = int(img_size / eval_crop_pct), then center crop
    scale: Tuple[float, float] = (0.08, 1.0)      # RandomResizedCrop area fraction
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)   # RandomResizedCrop aspect ratio
    hflip: float = 0.5
    rand_augment: Optional[str] = "rand-m9-mstd0.5-inc1"   # timm spec (randaug.py); null disables
    # DeiT III's 3-Augment instead (threeaug.py): per image one of grayscale, solarisation,
    # Gaussian blur, then colour jitter of strength color_jitter (brightness/contrast/
    # saturation). Needs rand_augment: null. color_jitter null (the default) is the reference's
    # --color-jitter 0.3 as it takes effect in its recipes: 0.3 inside 3-Augment, none next to
    # RandAugment (timm's create_transform drops it when auto_augment is set; a number there is
    # an error). A number sets the strength (0: no jitter); with neither RandAugment nor
    # 3-Augment it is create_transform's ColorJitter alone, which null leaves off there (the
    # reference would apply 0.3: set it to match; plain crop + flip is what the demo runs).
    three_augment: bool = False
    color_jitter: Optional[float] = None
    repeated_aug: int = 3              # repeats per index (reference RASampler); 1 disables
    # The reference uses RASampler only when distributed; true applies the repeats on a single
    # process too (copies then share a rank and usually a batch, augmented independently).
    repeated_aug_single_process: bool = False
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    device: str = "auto"               # auto | gpu | cpu: where DALI decodes (augmentation runs
                                       # on the training device either way)
    # Thread counts per rank; None: this rank's share of its cores (fastdeit.threads.thread_budget,
    # logged at start), which keeps DALI, the host threads and torch from oversubscribing.
    num_threads: Optional[int] = None  # DALI CPU threads
    host_threads: Optional[int] = None # CPU placement: threads that RandAugment + normalise
                                       # consecutive batches in parallel (plus one feeding DALI)
    prefetch: int = 2                  # DALI prefetch queue depth
    hw_decoder_load: float = 0.65      # GPU: share of JPEG decoding on the A100/H100/H200 hardware
                                       # decoder (the rest on CUDA cores); ignored on CPU
    # GPU train decoder: preallocate nvJPEG's buffers for images up to decoder_max_image
    # ([width, height] of the train set's largest image; ImageNet's by default), so no image
    # reallocates them mid-epoch. Per DALI thread: 5.5 B device + 2 x 3.7 B pinned per pixel of
    # that image (201 MiB + 2 x 134 MiB for ImageNet; [1024, 1024] for a set resized to at most
    # 1024 px: 5.5 + 2 x 3.7 MiB). Val never preallocates. fastdeit/data/README.md "GPU memory".
    decoder_preallocate: bool = True
    decoder_max_image: Tuple[int, int] = IMAGENET_LARGEST_IMAGE
    # Rotate JPEGs by their EXIF orientation tag. Off by default: PIL/torchvision, and so the
    # DeiT reference, timm and every published teacher, decode the stored pixels as they are;
    # DALI's decoders would rotate them (their default), feeding the student other images.
    exif_orientation: bool = False

    def __post_init__(self):
        size = tuple(self.decoder_max_image)
        if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
            raise ConfigError(f"data.decoder_max_image must be [width, height] in pixels, got "
                              f"{self.decoder_max_image!r}")
