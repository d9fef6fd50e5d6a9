"""One distribution, one import namespace: ``unpg``.

``loaders/`` installs as ``unpg.loaders`` and ``kernels/`` as ``unpg.kernels`` through
``package_dir``; an editable install (``pip install -e .``) maps them the same way, which is
why ``PYTHONPATH=.`` alone cannot import ``unpg.loaders``.
"""
from setuptools import setup

PACKAGES = {
    "unpg": "unpg",
    "unpg.models": "unpg/models",
    "unpg.data": "unpg/data",
    "unpg.eval": "unpg/eval",
    "unpg.tools": "unpg/tools",
    "unpg.loaders": "loaders",
    "unpg.kernels": "kernels",
}

setup(
    name="unpg",
    version="0.1.0",
    description="Face recognition with margin-based softmax losses and Unified Negative Pair Generation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    install_requires=[
        # Open lower bound on purpose: the Makefile installs $(TORCH_SPEC) first so that pip
        # never pulls a multi-GB CUDA build on a CPU machine (and GPU machines keep theirs).
        "torch>=2.4",
        "numpy>=1.24",
        "opencv-python-headless>=4.8",
        "pyyaml>=6.0",
        "scikit-learn>=1.3",
        "scipy>=1.10",  # sparse segment sums for IJB template aggregation
        "tqdm>=4.60",
        "tensorboard>=2.14",
        # The one strict JPEG check (libjpeg warnings count as corrupt; OpenCV cannot report them)
        # and the default loader decoder (releases the GIL, faster than cv2.imdecode).
        "simplejpeg>=1.7",
        "nvidia-dali-cuda120>=1.30; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        # onnx/onnxruntime/matplotlib are optional at run time; dev installs them so that the
        # ONNX export check and the ROC plots are tested too.
        "dev": [
            "pytest>=8", "ruff>=0.5", "onnx>=1.15", "onnxruntime>=1.17", "matplotlib>=3.7",
            "simplejpeg>=1.7", "numba>=0.59",
        ],
        "onnx": ["onnx>=1.15", "onnxruntime>=1.17"],
        "plot": ["matplotlib>=3.7"],
        # simplejpeg: a strict decoder that also catches JPEGs damaged inside the entropy data.
        "jpeg": ["simplejpeg>=1.7"],
        # numba: the packed loader's compiled decode -> normalised-row pass on a CPU device
        # (unpg.loaders.fused_normalize); without it the loader uses numpy, ~5 us/image slower.
        "fast": ["numba>=0.59"],
        # The fused cross-entropy peers bench/loss.py compares the kernel against (CUDA only).
        "bench": ["cut-cross-entropy", "liger-kernel"],
    },
)
