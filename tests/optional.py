"""Optional packages: a test that needs one skips, naming the package and the command that installs it.

`pip install -r requirements.txt` runs the suite with these tests skipped;
`pip install -r requirements-test.txt` installs them all (README, "Tests").
"""
import pytest

# module -> the package that pip installs it from
PACKAGES = {
    "diffusers": "diffusers",
    "wandb": "wandb",
    "yaml": "PyYAML",
    "huggingface_hub": "huggingface_hub",
    "torch_fidelity": "torch-fidelity",
    "scipy": "scipy",
}


def skip_reason(module):
    """Why a test is skipped without module, and how to install it."""
    package = PACKAGES[module.split(".")[0]]
    return f"needs {package}: pip install {package} (or pip install -r requirements-test.txt for every test)"


def needs(module):
    """The module, imported; without it the calling test (fixture, module) is skipped with the reason."""
    __tracebackhide__ = True                    # the skip is reported at the caller's line
    return pytest.importorskip(module, reason=skip_reason(module))
