"""Build and install ACF.

The Triton kernels live in the top-level ``kernels/`` folder and are installed as ``acf.kernels``
(never as a generic top-level ``kernels`` module).
"""
from setuptools import setup

setup(
    name="acf",
    version="0.1.0",
    description="Attentive Contractive Flows: contractive residual flows with Lipschitz self-attention",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["acf", "acf.kernels"],
    package_dir={"acf": "acf", "acf.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "scipy>=1.10",
        # Fused attention kernels; on CPU they run under TRITON_INTERPRET=1 (tests only).
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "pytest-benchmark>=4"],
    },
    entry_points={"console_scripts": ["acf=acf.cli:main"]},
)
