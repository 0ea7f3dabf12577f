"""vipd: a virtual-IP appliance for highly available Kubernetes control planes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vipd")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
