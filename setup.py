"""fastdeit: the fastest practical DeiT trainer (DALI + DeepSpeed + timm).

DALI ships one wheel per CUDA major version and both install the same `nvidia.dali` package, so
it is an extra rather than a hard requirement: pick exactly one.

    pip install -e ".[cuda12]"        # nvidia-dali-cuda120: any driver from R525 (make install's default)
    pip install -e ".[cuda13]"        # nvidia-dali-cuda130: R580+ drivers, one CUDA generation with
                                      # the index's CUDA 13 torch (make install CUDA=13)
    pip install -e ".[cuda12,dev]"    # plus tests, plots, TensorBoard, the trackers' packages
    pip install -e ".[trackers]"      # Weights & Biases and MLflow (logging.wandb, logging.mlflow)
    pip install -e ".[convert]"       # scipy + pyarrow for python -m fastdeit.data.convert

`make install [CUDA=12]` picks the matching torch and DALI builds and checks them against the
driver (python -m fastdeit.doctor); either build runs DALI's CPU graphs on hosts without a GPU.

Apex (fused Adam/LAMB) is optional and is not on the package index: build it from NVIDIA's
repository if you want optim.name=apex_fused_adam; everything else works without it.
"""
from setuptools import find_packages, setup

setup(
    name="fastdeit",
    version="0.1.0",
    description="Fast DeiT training: DALI GPU data pipeline, DeepSpeed ZeRO bf16, distillation",
    python_requires=">=3.9",
    packages=find_packages(include=["fastdeit", "fastdeit.*"]),
    install_requires=[
        # The oldest torch checked: 2.11, what the H200 test host runs (the GPU-path CPU tests pass
        # on 2.11.0 with torchvision 0.26; benchmarks/results/2026-12-03-gpu-suite-plan.md). Older
        # releases are not tested, so not claimed.
        "torch>=2.11",
        "torchvision>=0.26",   # torch 2.11's
        "timm>=1.0",
        "deepspeed>=0.14",
        "pyyaml",
        "tqdm",
        "numpy",
        "pillow",
    ],
    extras_require={
        "cuda12": ["nvidia-dali-cuda120>=1.40"],
        "cuda13": ["nvidia-dali-cuda130>=1.40"],
        # Experiment trackers (logging.wandb, logging.mlflow): mlflow-skinny has the client and
        # the file store, without the server's UI and its dependencies.
        "trackers": ["wandb", "mlflow-skinny"],
        # python -m fastdeit.data.convert: scipy reads Flowers-102's and Cars' .mat label files,
        # pyarrow Hugging Face parquet shards (the other kinds need neither)
        "convert": ["scipy", "pyarrow"],
        "dev": ["pytest", "matplotlib", "tensorboard", "wandb", "mlflow-skinny", "scipy", "pyarrow"],
    },
)
