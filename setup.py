"""tfusion: Transfusion pretraining in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="tfusion",
    version="0.1.0",
    description="Transfusion (next-token text + diffusion images, one transformer) in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["tfusion", "tfusion.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "array-record>=0.8",
        "tensorflow-datasets>=4.9",
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "absl-py",
        "numpy>=1.26",
        "scipy",
        "pillow",
        "matplotlib",
        "tqdm",
        # TensorBoard event files without TensorFlow (its event writer is TF-free).
        "tensorboard",
        # Reads diffusers' VAE weights (.safetensors) with numpy, no PyTorch.
        "safetensors",
        "msgpack",  # the record schema (tfusion/data/records.py); also a flax dependency
        # tfusion-demo: its images are the digits scikit-learn ships, judged by its MLP.
        "scikit-learn",
    ],
    extras_require={
        "test": ["pytest>=8", "scikit-image", "pyarrow"],
        # tfusion-precompute-latents --parquet (webdataset tars and COCO need nothing extra).
        "ingest": ["pyarrow"],
        # --workdir gs://...: etils.epath's GCS backend where TensorFlow is not installed.
        "gcs": ["gcsfs"],
        # PyTorch reference implementations, only for the equivalence tests. Exact pins: these
        # wheels are on the CI machines' disk (a looser torch would pull a multi-GB CUDA build).
        # Deviceless TPU topologies: tfusion-aot compiles for a pod with the TPU compiler, no
        # chips (the pod-mesh tests use it too). The libtpu build must match jax's release.
        "aot": ["libtpu==0.0.42.1; sys_platform == 'linux'"],
        "crosscheck": ["torch==2.14.1", "torchvision==0.29.1", "diffusers", "pytorch-fid",
                       "open_clip_torch"],
    },
    entry_points={
        "console_scripts": [
            "tfusion-demo=tfusion.demo.main:main",
            "tfusion-train=tfusion.train:main",
            "tfusion-generate=tfusion.generate.cli:main",
            "tfusion-eval=tfusion.evaluate.job:main",
            "tfusion-plot=tfusion.evaluate.plot:main",
            "tfusion-param-count=tfusion.param_count:main",
            "tfusion-train-vae=tfusion.vae.train:main",
            "tfusion-train-tokenizer=tfusion.data.tokenizer:main",
            "tfusion-precompute-latents=tfusion.data.precompute:main",
            "tfusion-vae-stats=tfusion.vae.stats:main",
            "tfusion-import-vq=tfusion.vae.vq_import:main",
            "tfusion-convert-mc=tfusion.evaluate.mc_convert:main",
            "tfusion-convert-inception=tfusion.evaluate.convert_inception:main",
            "tfusion-convert-clip=tfusion.evaluate.convert_clip:main",
            "tfusion-aot=tfusion.aot:main",
            "tfusion-config=tfusion.config_cli:main",
            "tfusion-make-text-records=tfusion.data.make_text_records:main",
            "tfusion-sweep=tfusion.scaling.sweep:main",
            "tfusion-scaling=tfusion.scaling.cli:main",
        ],
    },
)
