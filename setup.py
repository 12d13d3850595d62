from setuptools import find_packages, setup

setup(
    name="clorae_ds",
    version="0.1.0",
    description="DeepSpeed-scaled C-LoRAE training for unified multimodal information extraction",
    packages=find_packages(include=["clorae_ds", "clorae_ds.*"]),
    python_requires=">=3.10",
    # torch is not pinned here: install the build for your hardware first (README: torch==2.13.0 is the
    # CPU wheel on the project's machines; any other spec there pulls a multi-GB CUDA build).
    install_requires=[
        "torch>=2.3",
        "transformers>=4.56",  # from_pretrained(dtype=...)
        "tokenizers>=0.20",
        "sentencepiece>=0.2",
        "protobuf",
        "safetensors>=0.4",
        "deepspeed>=0.15",
        "webdataset>=0.2.90",
        "pillow",
        "numpy",
        "prometheus-client>=0.20",
        "pyyaml>=6",
    ],
    extras_require={
        # peft is only the benchmark's reference LoRA; hypothesis drives property tests.
        "dev": ["pytest>=8", "hypothesis>=6", "peft>=0.13"],
    },
)
