"""Every patch of torch / megatron-core / DeepSpeed behaviour lives in this package.

Each module names the versions it was written for and calls `require` before patching, so a version
it does not know fails loudly with one line instead of patching something that has moved.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from megatron_sgtm.errors import UserError


class CompatError(UserError, RuntimeError):
    """A third-party package version the patches here were not written for: a problem of the environment,
    not of the command's input, so exit status 1 (the one-line report is the same)."""

    exit_status = 1


def require(package: str, known: tuple[str, ...], patch: str) -> str:
    """The installed version of `package`; CompatError unless it starts with one of `known`."""
    try:
        installed = version(package)
    except PackageNotFoundError as err:
        raise CompatError(f"{patch}: {package} is not installed (written for {', '.join(known)})") from err
    if not any(installed == k or installed.startswith(k + ".") or installed.startswith(k + "+") for k in known):
        raise CompatError(f"{patch}: {package} {installed} is not a version this patch was written for "
                          f"({', '.join(known)}); see megatron_sgtm/compat/")
    return installed
