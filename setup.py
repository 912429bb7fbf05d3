"""Build and install inhibmoe_fast.

The Triton kernels live in the top-level ``kernels/`` folder and are installed
as the subpackage ``inhibmoe_fast.kernels``.

The C++ extension ``inhibmoe_fast._C`` (sources in ``csrc/``) is built with
``torch.utils.cpp_extension`` and ninja. It always contains the CPU kernels,
and the CUDA kernels when a CUDA toolkit and a CUDA build of PyTorch are present.
Environment variables:

- ``INHIBMOE_FAST_CUDA=1`` builds the CUDA kernels and fails when that is not
  possible; ``INHIBMOE_FAST_CUDA=0`` skips them. Unset, the build detects.
- ``TORCH_CUDA_ARCH_LIST`` selects the GPU architectures (default "8.0;9.0").
- ``CUDA_HOME`` selects the toolkit. When it is unset and ``nvcc`` on PATH is a
  shell wrapper that runs ``exec /path/to/cuda/bin/nvcc``, that path is used.
"""

import glob
import os
import re
import shutil
import sys

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def find_cuda_home():
    """Return the CUDA toolkit root from CUDA_HOME, CUDA_PATH or nvcc on PATH, or None."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            return os.environ[variable]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    with open(nvcc, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"#!"):
        # A wrapper script: take the nvcc it executes.
        match = re.search(rb"^\s*exec\s+\"?(/\S+?/bin/nvcc)\"?(\s|$)", head, re.MULTILINE)
        if match is None:
            return None
        nvcc = match.group(1).decode()
    return os.path.dirname(os.path.dirname(nvcc))


def cuda_requested():
    """Return True, False, or None (detect) from INHIBMOE_FAST_CUDA."""
    value = os.environ.get("INHIBMOE_FAST_CUDA", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"INHIBMOE_FAST_CUDA={value!r} is invalid; expected 1, 0 or auto")


def extension_modules():
    # torch.utils.cpp_extension reads CUDA_HOME when it is first imported.
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    requested = cuda_requested()
    cuda_possible = torch.version.cuda is not None and cuda_home is not None and os.path.isdir(cuda_home)
    if requested and not cuda_possible:
        raise RuntimeError(
            f"INHIBMOE_FAST_CUDA=1 but the CUDA kernels cannot be built: torch.version.cuda="
            f"{torch.version.cuda!r}, CUDA toolkit={cuda_home!r}; install a CUDA build of PyTorch and set CUDA_HOME"
        )
    use_cuda = cuda_possible if requested is None else requested

    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx_flags = ["-O3"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an OpenMP loop in the ATen headers, so without -fopenmp it runs on one
        # thread. The process already has PyTorch's libgomp loaded, and the extension uses that one.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    # Without it GCC keeps the branches of float comparisons (they could raise floating-point
    # exceptions, which the package never reads), and loops with a select do not vectorize.
    cxx_flags.append("-fno-trapping-math")
    if not use_cuda:
        return [CppExtension("inhibmoe_fast._C", sources, extra_compile_args={"cxx": cxx_flags},
                             extra_link_args=link_flags)]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    return [
        CUDAExtension(
            "inhibmoe_fast._C",
            sources + sorted(glob.glob("csrc/*.cu")),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    ]


def import_installed_kernels_package():
    """Import an installed top-level package named ``kernels``, if any, before setuptools does.

    setuptools runs the egg_info writers of every installed distribution. The writer of
    Hugging Face's kernels package (a dependency of transformers) imports kernels._internals,
    and with the checkout root first on sys.path that import would find this project's
    kernels/ folder instead and fail. Once imported, the installed package stays in sys.modules.
    """
    root = os.path.dirname(os.path.abspath(__file__))
    saved = sys.path[:]
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != root]
    try:
        import kernels  # noqa: F401
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


def main():
    from setuptools import setup

    import_installed_kernels_package()

    ext_modules = extension_modules()  # first, because it sets CUDA_HOME for torch.utils.cpp_extension
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="inhibmoe_fast",
        version="0.1.0",
        description="Mixture-of-Experts layer with neural inhibition: reference, fast CPU path and Triton kernels",
        long_description=open("README.md", encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        python_requires=">=3.9",
        packages=["inhibmoe_fast", "inhibmoe_fast.kernels"],
        package_dir={"inhibmoe_fast": "inhibmoe_fast", "inhibmoe_fast.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        install_requires=[
            "torch",
            "numpy",
            "ninja",
            # Triton publishes wheels for Linux only; elsewhere the Triton backend is unavailable.
            "triton; platform_system == 'Linux'",
        ],
        extras_require={
            "bench": ["scikit-learn", "matplotlib", "tqdm"],
            "dev": ["pytest", "pytest-benchmark", "hypothesis", "transformers"],
        },
        entry_points={"console_scripts": ["inhibmoe-bench = inhibmoe_fast.bench:main"]},
    )


if __name__ == "__main__":
    main()
