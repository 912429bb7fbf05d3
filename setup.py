"""Build and install inhibmoe_fast.

The Triton kernels live in the top-level ``kernels/`` folder and are installed
as the subpackage ``inhibmoe_fast.kernels``.
"""

from setuptools import setup

setup(
    name="inhibmoe_fast",
    version="0.1.0",
    description="Mixture-of-Experts layer with neural inhibition: reference, fast CPU path and Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["inhibmoe_fast", "inhibmoe_fast.kernels"],
    package_dir={"inhibmoe_fast": "inhibmoe_fast", "inhibmoe_fast.kernels": "kernels"},
    install_requires=[
        "torch",
        "numpy",
        "ninja",
        # Triton publishes wheels for Linux only; elsewhere the Triton backend is unavailable.
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "bench": ["scikit-learn", "matplotlib", "tqdm"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis"],
    },
    entry_points={"console_scripts": ["inhibmoe-bench = inhibmoe_fast.bench:main"]},
)
