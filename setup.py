from setuptools import find_packages, setup

setup(
    name="clorae_ds",
    version="0.1.0",
    description="DeepSpeed-scaled C-LoRAE training for unified multimodal information extraction",
    packages=find_packages(include=["clorae_ds", "clorae_ds.*"]),
    python_requires=">=3.10",
    # Lower bounds are the versions the whole suite passed on (.ci/run installs them, 2026-12-07); older
    # releases lack APIs the code uses (torch.get_autocast_dtype, transformers 5's multimodal outputs).
    # torch is not pinned here: install the build for your hardware first (README: torch==2.13.0 is the CPU
    # wheel on the project's machines; any other spec there pulls a multi-GB CUDA build).
    install_requires=[
        "torch>=2.13",
        "transformers>=5.25,<6",
        "tokenizers>=0.23",
        "sentencepiece>=0.2.3",
        "protobuf>=7",
        "safetensors>=0.8",
        # The engine swaps DeepSpeed internals (the gradient overflow check, ZeRO hooks): bounded above to the
        # minor release it was tested with.
        "deepspeed>=0.19.8,<0.20",
        "webdataset>=1.0.2",
        "pillow>=13",
        "numpy>=2.4",
        "prometheus-client>=0.26",
        "pyyaml>=6.0.4",
        "matplotlib>=3.11",  # training curves and routing plots
    ],
    extras_require={
        # peft is the benchmark's reference LoRA and loads exported adapters in tests; hypothesis drives property
        # tests; pytest-xdist runs them two at a time (pytest.ini); pytest-cov the tiers' coverage; tensorboard reads
        # the monitor test's event files.
        "dev": ["pytest>=9.2", "pytest-xdist>=3.8", "hypothesis>=6.170", "peft>=0.21.2", "pytest-cov>=7.1",
                "tensorboard>=2.21"],
        # The trackers of the DeepSpeed config's monitor sections (csv_monitor needs nothing).
        "tensorboard": ["tensorboard>=2.21"],
        "wandb": ["wandb>=0.31"],
        "comet": ["comet_ml"],
    },
)
